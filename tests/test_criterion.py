"""Tests of the matcher, the training criterion and contrastive denoising (CPU, tiny tensors)."""

import math

import pytest
import torch
from torchvision.ops import box_convert

from grounding_dino.modeling.criterion import DEFAULT_WEIGHT_DICT, GroundingCriterion
from grounding_dino.modeling.denoising import dn_match_indices, prepare_for_cdn, split_dn_outputs
from grounding_dino.modeling.matcher import HungarianMatcher

T = 16  # token slots (the model uses 256)
BIG = 12.0  # a confident logit


def _posmap(spans, num_tokens=T):
    """Row-normalised positive maps from token index lists."""
    pm = torch.zeros(len(spans), num_tokens)
    for i, toks in enumerate(spans):
        pm[i, toks] = 1.0 / len(toks)
    return pm


def _target(boxes, spans):
    boxes = torch.tensor(boxes, dtype=torch.float).reshape(-1, 4)
    return {
        "boxes": boxes,
        "positive_map": _posmap(spans),
        "labels": torch.arange(len(boxes), dtype=torch.long),
    }


def _text_mask(bs, num_valid):
    mask = torch.zeros(bs, T, dtype=torch.bool)
    mask[:, :num_valid] = True
    return mask


def _logits(bs, nq, text_mask, fill=-BIG):
    logits = torch.full((bs, nq, T), fill)
    return logits.masked_fill(~text_mask[:, None, :], float("-inf"))


def _criterion(**kwargs):
    return GroundingCriterion(HungarianMatcher(), **kwargs)


# ----------------------------------------------------------------------------- matcher
def test_matcher_picks_obvious_assignment():
    mask = _text_mask(1, 8)
    tgt = _target([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.4]], [[1, 2], [4]])
    logits = _logits(1, 4, mask)
    boxes = torch.tensor(
        [[[0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.1, 0.1], [0.9, 0.1, 0.05, 0.05]]]
    )
    logits[0, 2, [1, 2]] = BIG
    logits[0, 0, 4] = BIG
    q, t = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 2, 1: 0}
    assert q.dtype == torch.int64 and t.dtype == torch.int64


def test_matcher_class_cost_breaks_box_ties():
    # Two queries with identical boxes: only the token logits tell them apart.
    mask = _text_mask(1, 8)
    tgt = _target([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]], [[1], [5, 6]])
    logits = _logits(1, 2, mask)
    logits[0, 0, [5, 6]] = BIG
    logits[0, 1, 1] = BIG
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2])
    q, t = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 1, 1: 0}
    # Swapping the logits swaps the assignment.
    q, t = HungarianMatcher()({"pred_logits": logits.flip(1), "pred_boxes": boxes}, [tgt])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 0, 1: 1}


def test_matcher_cost_matches_naive_formula():
    torch.manual_seed(0)
    mask = _text_mask(1, 9)
    logits = torch.randn(1, 5, T).masked_fill(~mask[:, None], float("-inf"))
    boxes = torch.rand(1, 5, 4) * 0.4 + 0.3
    tgt = _target(
        [[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.1], [0.5, 0.5, 0.5, 0.5]], [[1, 2], [4], [6, 7, 8]]
    )
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    cost = matcher.cost_matrix(logits[0], boxes[0], tgt["boxes"], tgt["positive_map"])
    a, g = 0.25, 2.0
    for q in range(5):
        for t in range(3):
            w = tgt["positive_map"][t]
            p = logits[0, q].sigmoid()
            pos = a * (1 - p) ** g * -torch.log(p + 1e-8)
            neg = (1 - a) * p**g * -torch.log(1 - p + 1e-8)
            c_cls = ((pos - neg) * w)[w > 0].sum()
            c_l1 = (boxes[0, q] - tgt["boxes"][t]).abs().sum()
            bq = box_convert(boxes[0, q], "cxcywh", "xyxy")
            bt = box_convert(tgt["boxes"][t], "cxcywh", "xyxy")
            inter = (torch.min(bq[2:], bt[2:]) - torch.max(bq[:2], bt[:2])).clamp(min=0).prod()
            union = (bq[2:] - bq[:2]).prod() + (bt[2:] - bt[:2]).prod() - inter
            hull = (torch.max(bq[2:], bt[2:]) - torch.min(bq[:2], bt[:2])).prod()
            giou = inter / union - (hull - union) / hull
            expected = c_cls + 5.0 * c_l1 - 2.0 * giou
            assert cost[q, t].item() == pytest.approx(expected.item(), abs=1e-5)


def test_matcher_images_without_targets():
    mask = _text_mask(2, 6)
    targets = [_target([], []), _target([[0.3, 0.3, 0.2, 0.2]], [[2]])]
    outputs = {"pred_logits": _logits(2, 5, mask), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.2}
    outputs["pred_boxes"][1, 3] = torch.tensor([0.3, 0.3, 0.2, 0.2])
    (q0, t0), (q1, t1) = HungarianMatcher()(outputs, targets)
    assert len(q0) == 0 and len(t0) == 0
    assert q1.tolist() == [3] and t1.tolist() == [0]


def test_matcher_bad_input_errors():
    mask = _text_mask(1, 6)
    outputs = {"pred_logits": _logits(1, 3, mask), "pred_boxes": torch.rand(1, 3, 4)}
    bad = _target([[0.3, 0.3, 0.2, 0.2]], [[2]])
    bad["positive_map"] = bad["positive_map"][:, :8]
    with pytest.raises(ValueError, match="positive_map"):
        HungarianMatcher()(outputs, [bad])
    with pytest.raises(ValueError, match="target dicts"):
        HungarianMatcher()(outputs, [])
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(outputs, [_target([[0.3, 0.3, 0.2, 0.2]], [[2]])])


# ----------------------------------------------------------------------------- criterion
def _perfect_outputs(targets, mask, nq=6):
    """Predictions where query i is exactly target i (binarised tokens, exact boxes)."""
    bs = len(targets)
    logits = _logits(bs, nq, mask)
    boxes = torch.full((bs, nq, 4), 0.5)
    boxes[..., 2:] = 0.1
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        boxes[b, :n] = t["boxes"]
        logits[b, :n] = torch.where(t["positive_map"] > 0, BIG, logits[b, :n])
    return {"pred_logits": logits, "pred_boxes": boxes, "text_mask": mask}


def _two_image_targets():
    return [
        _target([[0.25, 0.3, 0.2, 0.3], [0.7, 0.7, 0.4, 0.2]], [[1, 2], [4]]),
        _target([[0.5, 0.5, 0.6, 0.6]], [[3]]),
    ]


def test_losses_near_zero_for_perfect_predictions_and_grow_with_errors():
    mask = _text_mask(2, 8)
    targets = _two_image_targets()
    outputs = _perfect_outputs(targets, mask)
    losses = _criterion()(outputs, targets)
    assert losses["loss_bbox"].item() < 1e-6
    assert losses["loss_giou"].item() < 1e-4  # torchvision's eps
    assert losses["loss_class"].item() < 1e-3

    shifted = dict(outputs, pred_boxes=outputs["pred_boxes"].clone())
    shifted["pred_boxes"][0, 0, 0] += 0.05
    worse = _criterion()(shifted, targets)
    assert worse["loss_bbox"].item() == pytest.approx(DEFAULT_WEIGHT_DICT["loss_bbox"] * 0.05 / 3)
    assert worse["loss_giou"].item() > 1e-3

    more_shifted = dict(outputs, pred_boxes=outputs["pred_boxes"].clone())
    more_shifted["pred_boxes"][0, 0, 0] += 0.1
    assert _criterion()(more_shifted, targets)["loss_giou"] > worse["loss_giou"]

    wrong_token = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    wrong_token["pred_logits"][1, 3, 5] = BIG  # an unmatched query fires on a valid token
    assert _criterion()(wrong_token, targets)["loss_class"].item() > 0.5
    missed = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    missed["pred_logits"][1, 0, 3] = -BIG  # the matched query misses its token
    assert _criterion()(missed, targets)["loss_class"].item() > 0.5


def test_class_loss_ignores_invalid_tokens():
    targets = _two_image_targets()
    mask = _text_mask(2, 8)
    outputs = _perfect_outputs(targets, mask)
    base = _criterion()(outputs, targets)["loss_class"]
    # A confident logit at a padded token (the model writes -inf there) changes nothing.
    changed = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    changed["pred_logits"][0, 4, 10] = BIG
    assert torch.equal(_criterion()(changed, targets)["loss_class"], base)


def test_weights_are_applied_and_overridable():
    targets = _two_image_targets()
    outputs = _perfect_outputs(targets, _text_mask(2, 8))
    outputs["pred_boxes"] = outputs["pred_boxes"] + 0.01
    outputs["aux_outputs"] = [{k: outputs[k] for k in ("pred_logits", "pred_boxes")}]
    default = _criterion()(outputs, targets)
    custom = _criterion(weight_dict={"loss_bbox": 1.0, "loss_bbox_0": 3.0})(outputs, targets)
    assert default["loss_bbox"].item() == pytest.approx(5 * custom["loss_bbox"].item())
    assert custom["loss_bbox_0"].item() == pytest.approx(3 * custom["loss_bbox"].item())
    assert custom["loss_giou"].item() == pytest.approx(default["loss_giou"].item())
    only_boxes = _criterion(losses=("boxes",))(outputs, targets)
    assert not any(k.startswith("loss_class") for k in only_boxes)
    with pytest.raises(ValueError, match="unknown losses"):
        _criterion(losses=("labels", "masks"))


def _require_grad(outputs):
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    return outputs


def test_gradients_flow_to_logits_and_boxes():
    targets = _two_image_targets()
    mask = _text_mask(2, 8)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, T).masked_fill(~mask[:, None], float("-inf")).requires_grad_()
    boxes = (torch.rand(2, 6, 4) * 0.4 + 0.2).requires_grad_()
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes, "text_mask": mask}, targets)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert logits.grad[:, :, :8].abs().sum() > 0
    assert logits.grad[:, :, 8:].abs().sum() == 0  # padded tokens get no gradient
    assert (boxes.grad.abs().sum(-1) > 0).sum() == 3  # exactly the three matched queries


@pytest.mark.parametrize("all_empty", [False, True])
def test_images_without_targets(all_empty):
    mask = _text_mask(2, 8)
    targets = _two_image_targets()
    targets[0] = _target([], [])
    if all_empty:
        targets[1] = _target([], [])
    torch.manual_seed(0)
    outputs = _require_grad(
        {
            "pred_logits": torch.randn(2, 5, T).masked_fill(~mask[:, None], float("-inf")),
            "pred_boxes": torch.rand(2, 5, 4) * 0.4 + 0.2,
            "text_mask": mask,
        }
    )
    outputs["aux_outputs"] = [{k: outputs[k] * 1.0 for k in ("pred_logits", "pred_boxes")}]
    outputs["enc_outputs"] = {k: outputs[k] * 1.0 for k in ("pred_logits", "pred_boxes")}
    losses = _criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v.requires_grad for v in losses.values())
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(outputs["pred_boxes"].grad).all()
    assert outputs["pred_logits"].grad[:, :, :8].abs().sum() > 0  # all-negative focal loss
    if all_empty:
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou_enc"].item() == 0
        assert outputs["pred_boxes"].grad.abs().sum() == 0
    else:
        assert losses["loss_bbox"].item() > 0


# ----------------------------------------------------------------------------- denoising
def _text(bs=2, dim=8, num_valid=(8, 6)):
    torch.manual_seed(1)
    feats = torch.randn(bs, T, dim)
    mask = torch.zeros(bs, T, dtype=torch.bool)
    for b, n in enumerate(num_valid):
        mask[b, :n] = True
    return feats, mask


def _dn_targets():
    return [
        _target(
            [[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2], [0.6, 0.5, 0.2, 0.1]], [[1, 2], [3], [5]]
        ),
        _target([[0.5, 0.5, 0.3, 0.3]], [[2]]),
    ]


def test_cdn_shapes_and_attention_mask():
    feats, mask = _text()
    num_queries = 7
    content, boxes, attn, meta = prepare_for_cdn(
        _dn_targets(), feats, mask, num_queries, dn_number=10
    )
    m, g = 3, 10 // 3
    p = 2 * m * g
    assert meta == {
        "pad_size": p,
        "num_groups": g,
        "group_size": 2 * m,
        "max_targets": m,
        "num_targets": [3, 1],
    }
    assert content.shape == (2, p, 8) and boxes.shape == (2, p, 4)
    assert attn.shape == (p + num_queries, p + num_queries) and attn.dtype == torch.bool
    assert attn[p:, :p].all()  # matching queries are blind to the denoising queries
    assert not attn[p:, p:].any()
    assert not attn[:p, p:].any()  # denoising queries see the matching queries
    for i in range(g):
        for j in range(g):
            block = attn[2 * m * i : 2 * m * (i + 1), 2 * m * j : 2 * m * (j + 1)]
            assert block.all() if i != j else not block.any()
    # Padding slots (image 1 has one target out of M = 3) are zeros.
    group = content[1].view(g, 2, m, 8)
    assert group[:, :, 1:].abs().sum() == 0 and boxes[1].view(g, 2, m, 4)[:, :, 1:].abs().sum() == 0


def test_cdn_content_is_phrase_feature_without_label_noise():
    feats, mask = _text()
    targets = _dn_targets()
    content, _, _, meta = prepare_for_cdn(
        targets, feats, mask, 5, dn_number=6, label_noise_ratio=0.0
    )
    m, g = meta["max_targets"], meta["num_groups"]
    slots = content.view(2, g, 2, m, -1)
    expected0 = torch.stack([feats[0, [1, 2]].mean(0), feats[0, 3], feats[0, 5]])
    torch.testing.assert_close(slots[0], expected0.expand(g, 2, m, -1))
    torch.testing.assert_close(slots[1, :, :, 0], feats[1, 2].expand(g, 2, -1))
    # Text features narrower than the positive maps (the batch's longest caption < T).
    narrow, _, _, _ = prepare_for_cdn(
        targets, feats[:, :8], mask[:, :8], 5, dn_number=6, label_noise_ratio=0.0
    )
    torch.testing.assert_close(narrow, content)


def test_cdn_label_noise_uses_valid_tokens_of_the_caption():
    feats, mask = _text(num_valid=(8, 6))
    targets = [_target([[0.5, 0.5, 0.2, 0.2]] * 20, [[1, 2]] * 20), _target([], [])]
    torch.manual_seed(0)
    content, _, _, meta = prepare_for_cdn(
        targets, feats, mask, 5, dn_number=200, label_noise_ratio=1.0
    )
    slots = content[0]  # image 0: every slot is a real target
    phrase = feats[0, [1, 2]].mean(0)
    is_phrase = torch.isclose(slots, phrase, atol=1e-6).all(-1)
    dist = (slots[:, None] - feats[0][None]).abs().amax(-1)  # [P, T]
    is_token = dist.min(-1).values < 1e-5
    assert (is_phrase | is_token).all()
    assert (dist[~is_phrase].argmin(-1) < 8).all()  # only valid tokens are drawn
    frac = 1 - is_phrase.float().mean().item()
    assert 0.4 < frac < 0.6  # label_noise_ratio / 2 of the queries are relabelled
    assert content[1].abs().sum() == 0  # image 1 has no targets: all padding


def test_cdn_noised_boxes_within_bounds():
    feats, mask = _text()
    scale = 0.4  # small enough that no negative box turns inside out
    targets = [
        _target([[0.5, 0.5, 0.2, 0.3]] * 4, [[1]] * 4),
        _target([[0.5, 0.5, 0.3, 0.2]], [[2]]),
    ]
    torch.manual_seed(3)
    _, boxes_u, _, meta = prepare_for_cdn(
        targets, feats, mask, 5, dn_number=200, box_noise_scale=scale
    )
    g, m = meta["num_groups"], meta["max_targets"]
    boxes = boxes_u.sigmoid().view(2, g, 2, m, 4)[0]  # image 0: all slots real
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    assert (xyxy >= -1e-3).all() and (xyxy <= 1 + 1e-3).all()
    gt = box_convert(torch.tensor([0.5, 0.5, 0.2, 0.3]), "cxcywh", "xyxy")
    half = torch.tensor([0.1, 0.15, 0.1, 0.15]) * scale
    shift = (xyxy - gt).abs() / half  # in units of the scaled half size
    assert (shift[:, 0] <= 1 + 1e-2).all()  # positives: within one half size
    assert (shift[:, 1] >= 1 - 1e-2).all() and (shift[:, 1] <= 2 + 1e-2).all()  # negatives
    assert shift[:, 0].std() > 0.1  # actually random
    # Large noise near the border: still valid boxes inside the image.
    targets = [_target([[0.05, 0.9, 0.1, 0.2]] * 4, [[1]] * 4), _target([], [])]
    _, boxes_u, _, _ = prepare_for_cdn(targets, feats, mask, 5, dn_number=200, box_noise_scale=2.0)
    xyxy = box_convert(boxes_u[0].sigmoid(), "cxcywh", "xyxy")
    assert (xyxy >= -1e-3).all() and (xyxy <= 1 + 1e-3).all()
    assert (boxes_u[0].sigmoid()[:, 2:] > 0).all()


def test_cdn_no_targets_and_determinism():
    feats, mask = _text()
    empty = [_target([], []), _target([], [])]
    assert prepare_for_cdn(empty, feats, mask, 5) == (None, None, None, None)
    assert prepare_for_cdn(_dn_targets(), feats, mask, 5, dn_number=0) == (None,) * 4
    torch.manual_seed(7)
    first = prepare_for_cdn(_dn_targets(), feats, mask, 5)
    torch.manual_seed(7)
    second = prepare_for_cdn(_dn_targets(), feats, mask, 5)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(5)
    third = prepare_for_cdn(_dn_targets(), feats, mask, 5, generator=gen)
    gen = torch.Generator().manual_seed(5)
    fourth = prepare_for_cdn(_dn_targets(), feats, mask, 5, generator=gen)
    assert torch.equal(third[0], fourth[0]) and torch.equal(third[1], fourth[1])
    assert not torch.equal(first[1], third[1])
    with pytest.raises(ValueError, match="text_mask"):
        prepare_for_cdn(_dn_targets(), feats, mask[:, :4], 5)


def test_split_and_match_indices():
    meta = {
        "pad_size": 8,
        "num_groups": 2,
        "group_size": 4,
        "max_targets": 2,
        "num_targets": [2, 0],
    }
    x = torch.arange(3 * 2 * 11).view(3, 2, 11, 1)
    dn, match = split_dn_outputs(x, meta)
    assert dn.shape == (3, 2, 8, 1) and match.shape == (3, 2, 3, 1)
    assert split_dn_outputs(x, None) == (None, x)
    (q0, t0), (q1, t1) = dn_match_indices(meta)
    assert q0.tolist() == [0, 1, 4, 5] and t0.tolist() == [0, 1, 0, 1]
    assert len(q1) == 0 and len(t1) == 0


# ----------------------------------------------------------------------------- end to end
def _full_outputs(targets, mask, nq, dn_meta, num_layers=3, seed=0):
    """Outputs with aux, enc and denoising parts; dn positives predict their target exactly."""
    torch.manual_seed(seed)
    bs = len(targets)
    p = dn_meta["pad_size"]

    def layer(n):
        return {
            "pred_logits": torch.randn(bs, n, T).masked_fill(~mask[:, None], float("-inf")),
            "pred_boxes": torch.rand(bs, n, 4) * 0.4 + 0.2,
        }

    layers = [_require_grad(layer(p + nq)) for _ in range(num_layers)]
    for lay in layers:  # perfect positive denoising boxes
        with torch.no_grad():
            for b, (q, t) in enumerate(dn_match_indices(dn_meta)):
                lay["pred_boxes"][b, q] = targets[b]["boxes"][t]
    split = [{k: split_dn_outputs(v, dn_meta) for k, v in lay.items()} for lay in layers]
    dn = [{k: v[0] for k, v in s.items()} for s in split]
    match = [{k: v[1] for k, v in s.items()} for s in split]
    outputs = dict(match[-1], text_mask=mask, aux_outputs=match[:-1], enc_outputs=layer(nq))
    outputs["dn_outputs"] = dict(dn[-1], aux_outputs=dn[:-1])
    return outputs, layers


def test_full_loss_dict_with_denoising():
    feats, mask = _text()
    targets = _dn_targets()
    _, _, _, meta = prepare_for_cdn(targets, feats, mask, 6, dn_number=12)
    outputs, layers = _full_outputs(targets, mask, 6, meta)
    losses = _criterion()(outputs, targets, meta)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    assert set(losses) == {k + s for s in suffixes for k in DEFAULT_WEIGHT_DICT}
    assert all(torch.isfinite(v) for v in losses.values())
    for s in ("_dn", "_dn_0", "_dn_1"):
        assert losses["loss_bbox" + s].item() < 1e-6 and losses["loss_giou" + s].item() < 1e-4
    assert losses["loss_bbox"].item() > 0.1
    # dn_meta can also travel inside the outputs; the results are deterministic.
    again = _criterion()(dict(outputs, dn_meta=meta), targets)
    assert all(torch.equal(losses[k], again[k]) for k in losses)
    sum(losses.values()).backward()
    for lay in layers:
        assert lay["pred_logits"].grad[:, : meta["pad_size"], :6].abs().sum() > 0
        assert torch.isfinite(lay["pred_logits"].grad).all()
    # The denoising targets must be the ones the queries were built for.
    with pytest.raises(ValueError, match="dn_meta"):
        _criterion()(outputs, [targets[0], _target([], [])], meta)


def test_denoising_losses_present_as_zeros_without_dn():
    targets = [_target([], []), _target([], [])]
    mask = _text_mask(2, 8)
    outputs = _require_grad(
        {"pred_logits": _logits(2, 4, mask), "pred_boxes": torch.rand(2, 4, 4), "text_mask": mask}
    )
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * 1.0, "pred_boxes": outputs["pred_boxes"] * 1.0}
    ]
    losses = _criterion()(outputs, targets, dn_meta=None)
    for s in ("_dn", "_dn_0"):
        for k in DEFAULT_WEIGHT_DICT:
            assert losses[k + s].item() == 0 and losses[k + s].requires_grad
    assert math.isfinite(sum(losses.values()).item())


def test_dn_content_carries_gradient_to_text_features():
    feats, mask = _text()
    feats.requires_grad_(True)
    content, _, _, _ = prepare_for_cdn(_dn_targets(), feats, mask, 5, dn_number=6)
    content.sum().backward()
    assert feats.grad[:, :8].abs().sum() > 0
    assert feats.grad[:, 8:].abs().sum() == 0  # padded tokens are never used
