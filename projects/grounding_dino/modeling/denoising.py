"""Contrastive denoising (DINO's CDN) adapted to grounded targets.

DINO feeds the decoder noised copies of the ground truth ("denoising queries") next to the
matching queries and asks it to reconstruct them; because each denoising query is tied to its
target by construction, it needs no Hungarian matching. Each group holds one positive and one
negative copy of every target: positives get small box noise and must reconstruct the target,
negatives get larger noise and must predict "no object".

Text adaptation: DINO encodes a denoising query's class with a learned label embedding. The
official Grounding DINO checkpoints have none, so here the content of a denoising query has no
parameters: it is the target's phrase embedding, the positive-map-weighted mean of the caption's
text features. Label noise swaps it for the feature of a random valid token of the same caption
(the text analogue of DINO's random class from its label book; it may hit one of the target's own
tokens, as DINO's random class may equal the true one).

Layout of the P = 2 * M * G denoising queries of each image (M = most targets in any image of the
batch, G = number of groups): group g occupies ``[2 M g, 2 M (g + 1))``, its first M slots are the
positive copies of targets 0..M-1 and the next M the negative copies. Slots past an image's own
number of targets are padding (zero content, box logits 0) and are trained as "no object". The
decoder input is ``cat([dn_queries, matching_queries], dim=1)``, P first.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.ops import box_convert

__all__ = ["prepare_for_cdn", "split_dn_outputs", "dn_match_indices"]


def _phrase_features(
    targets: Sequence[Dict[str, torch.Tensor]],
    text_features: torch.Tensor,
    text_mask: torch.Tensor,
    max_targets: int,
) -> torch.Tensor:
    """Positive-map-weighted mean of the text features for every target.

    Returns:
        [B, M, C]; rows past an image's number of targets are zero.
    """
    bs, num_tokens, _ = text_features.shape
    maps = text_features.new_zeros(bs, max_targets, num_tokens)
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        if n:
            # Positive maps are max_text_len wide; the text features may stop at the batch's
            # longest caption, past which every positive map is zero.
            width = min(num_tokens, t["positive_map"].shape[1])
            maps[b, :n, :width] = t["positive_map"][:, :width].to(maps)
    maps = maps * text_mask[:, None, :].to(maps)
    maps = maps / maps.sum(-1, keepdim=True).clamp(min=1e-6)
    return maps @ text_features


def prepare_for_cdn(
    targets: Sequence[Dict[str, torch.Tensor]],
    text_features: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    num_queries: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[Dict]]:
    """Build the contrastive denoising queries of a training batch.

    Args:
        targets: list of B dicts with "boxes" [N_b, 4] (cxcywh in [0, 1]) and
            "positive_map" [N_b, max_text_len] (see docs/interfaces.md).
        text_features: [B, T, C] text token features (the decoder's text memory), T <=
            max_text_len (columns of the positive maps past T are ignored). The content
            queries are built from them and keep their gradient.
        text_mask: [B, T] bool, True on valid tokens.
        num_queries: Q, number of matching queries that follow the denoising ones.
        dn_number: budget of denoising queries per polarity; the number of groups is
            ``max(1, dn_number // M)`` as in DINO, M the most targets in any image.
        label_noise_ratio: a positive or negative query has its content replaced with
            probability ``label_noise_ratio / 2`` (DINO's convention).
        box_noise_scale: box corners move by up to ``box_noise_scale`` times half the box size
            for positives, and between 1x and 2x that for negatives.
        generator: optional random generator (on the targets' device) for reproducibility; the
            global generator otherwise.

    Returns:
        (dn_content [B, P, C], dn_boxes_unsigmoid [B, P, 4] (logit of cxcywh),
        attn_mask [P + Q, P + Q] bool with True where a query may NOT attend, dn_meta dict with
        "pad_size" (P), "num_groups" (G), "group_size" (2 M), "max_targets" (M),
        "num_targets" (list of N_b)). All four are None when dn_number <= 0 or the batch has no
        targets.
    """
    if text_features.dim() != 3 or text_mask.shape != text_features.shape[:2]:
        raise ValueError(
            f"prepare_for_cdn: text_features must be [B, T, C] and text_mask [B, T], got "
            f"{tuple(text_features.shape)} and {tuple(text_mask.shape)}."
        )
    if len(targets) != text_features.shape[0]:
        raise ValueError(
            f"prepare_for_cdn: {len(targets)} target dicts for {text_features.shape[0]} images."
        )
    num_targets = [len(t["boxes"]) for t in targets]
    max_targets = max(num_targets, default=0)
    if dn_number <= 0 or max_targets == 0:
        return None, None, None, None

    device = text_features.device
    bs, num_tokens, dim = text_features.shape
    num_groups = max(1, dn_number // max_targets)
    group_size = 2 * max_targets
    pad_size = group_size * num_groups
    # Slots of shape [B, G, 2 (positive, negative), M].
    slot_shape = (bs, num_groups, 2, max_targets)
    valid = (
        torch.arange(max_targets, device=device)[None, :]
        < torch.as_tensor(num_targets, device=device)[:, None]
    )
    valid = valid[:, None, None, :].expand(slot_shape)

    def rand(*shape):
        return torch.rand(shape, generator=generator, device=device)

    # Content: the target's phrase feature, or (label noise) a random valid token's feature.
    content = _phrase_features(targets, text_features, text_mask, max_targets)
    content = content[:, None, None].expand(*slot_shape, dim)
    if label_noise_ratio > 0:
        token_weights = text_mask.float()
        has_tokens = token_weights.sum(-1) > 0
        token_weights[~has_tokens] = 1.0
        num_slots = num_groups * 2 * max_targets
        token_idx = torch.multinomial(token_weights, num_slots, True, generator=generator)
        noise_content = torch.gather(
            text_features, 1, token_idx[..., None].expand(bs, num_slots, dim)
        ).view(*slot_shape, dim)
        flip = (rand(*slot_shape) < label_noise_ratio * 0.5) & has_tokens[:, None, None, None]
        content = torch.where(flip[..., None], noise_content, content)
    content = content * valid[..., None].to(content)

    # Boxes: DINO's corner noise, negatives pushed at least one half-size away.
    boxes = text_features.new_zeros(bs, max_targets, 4)
    for b, t in enumerate(targets):
        if num_targets[b]:
            boxes[b, : num_targets[b]] = t["boxes"].to(boxes)
    boxes = boxes[:, None, None].expand(*slot_shape, 4)
    if box_noise_scale > 0:
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = (boxes[..., 2:] / 2).repeat(1, 1, 1, 1, 2)
        magnitude = rand(*slot_shape, 4)
        magnitude[:, :, 1] += 1.0
        sign = rand(*slot_shape, 4).round() * 2.0 - 1.0
        xyxy = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
        boxes = box_convert(xyxy, "xyxy", "cxcywh")
    boxes_unsigmoid = torch.logit(boxes, eps=1e-3) * valid[..., None].to(boxes)

    attn_mask = torch.zeros(pad_size + num_queries, pad_size + num_queries, dtype=torch.bool)
    attn_mask[pad_size:, :pad_size] = True  # matching queries never see the ground truth
    for g in range(num_groups):
        start, end = g * group_size, (g + 1) * group_size
        attn_mask[start:end, :start] = True  # groups never see each other
        attn_mask[start:end, end:pad_size] = True
    dn_meta = {
        "pad_size": pad_size,
        "num_groups": num_groups,
        "group_size": group_size,
        "max_targets": max_targets,
        "num_targets": num_targets,
    }
    return (
        content.reshape(bs, pad_size, dim),
        boxes_unsigmoid.reshape(bs, pad_size, 4),
        attn_mask.to(device),
        dn_meta,
    )


def split_dn_outputs(
    tensor: torch.Tensor, dn_meta: Optional[Dict]
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Split decoder outputs into their denoising and matching parts.

    Args:
        tensor: [..., P + Q, D] (e.g. [B, P + Q, D] or stacked layers [L, B, P + Q, D]).
        dn_meta: the dict from :func:`prepare_for_cdn`, or None (then nothing is split).

    Returns:
        (dn part [..., P, D] or None, matching part [..., Q, D]).
    """
    if dn_meta is None:
        return None, tensor
    pad_size = dn_meta["pad_size"]
    return tensor[..., :pad_size, :], tensor[..., pad_size:, :]


def dn_match_indices(
    dn_meta: Dict, device: Optional[torch.device] = None
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The fixed query-target assignment of the positive denoising queries.

    Args:
        dn_meta: the dict from :func:`prepare_for_cdn`.
        device: device of the returned tensors.

    Returns:
        list of B pairs (query_idx, target_idx) of long tensors with G * N_b entries each: the
        positive copy of target j in group g is query ``g * group_size + j``.
    """
    group_starts = torch.arange(dn_meta["num_groups"], device=device) * dn_meta["group_size"]
    indices = []
    for n in dn_meta["num_targets"]:
        tgt = torch.arange(n, device=device)
        query = (group_starts[:, None] + tgt[None, :]).flatten()
        indices.append((query, tgt.repeat(dn_meta["num_groups"])))
    return indices
