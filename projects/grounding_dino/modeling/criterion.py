"""Training losses of Grounding DINO.

For every prediction set (the last decoder layer, each earlier decoder layer, the encoder
proposals and the denoising queries of every layer) the criterion assigns queries to targets
(Hungarian matching, or the fixed assignment of the denoising queries) and computes:

- ``loss_class``: sigmoid focal loss between the query-token logits and the token targets
  (a matched query's target is its target's binarised positive map, an unmatched one's is
  all zeros), over the valid tokens only;
- ``loss_bbox``: L1 between matched cxcywh boxes;
- ``loss_giou``: 1 - GIoU between matched boxes;

each summed and divided by the number of target boxes (averaged over processes, at least 1;
times the number of groups for denoising). Key suffixes: none for the last layer, ``_{i}`` for
decoder layer i (of aux_outputs), ``_enc`` for the encoder proposals, ``_dn`` and ``_dn_{i}``
for the denoising queries.

The returned losses are already multiplied by their weights, so the meta-architecture returns
them as they are and detectron2's trainer sums them.

Without denoising, matching and losses equal transformers' ``GroundingDinoHungarianMatcher`` and
``GroundingDinoImageLoss`` (``loss_class`` is their ``loss_ce``); tests/test_criterion.py checks
it and lists the inputs on which transformers differs.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from grounding_dino.modeling.denoising import dn_match_indices
from grounding_dino.modeling.matcher import HungarianMatcher, check_targets

__all__ = ["GroundingCriterion"]

_LOSS_KEYS = {"labels": ("loss_class",), "boxes": ("loss_bbox", "loss_giou")}
# A weight_dict key is a base loss name, optionally with one of the suffixes of the module doc.
_WEIGHT_KEY = re.compile(r"^(loss_class|loss_bbox|loss_giou)(_\d+|_enc|_dn|_dn_\d+)?$")

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class GroundingCriterion(nn.Module):
    """Set-prediction losses on token logits and boxes, with auxiliary and denoising terms."""

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        focal_alpha: float,
        focal_gamma: float,
        losses: Sequence[str],
    ):
        """
        Args:
            matcher: assigns queries to targets.
            weight_dict: weight per loss. Every base name of the requested losses
                ("loss_class" for "labels", "loss_bbox" and "loss_giou" for "boxes") is required
                and applies to all its suffixed variants; a full key (e.g. "loss_class_enc",
                "loss_bbox_dn_0") overrides it for that key only.
            focal_alpha, focal_gamma: parameters of the token focal loss.
            losses: which loss groups to compute, from "labels" and "boxes".
        """
        super().__init__()
        if isinstance(losses, str):
            raise TypeError(
                f"GroundingCriterion: losses must be a sequence of names, got {losses!r}."
            )
        unknown = set(losses) - set(_LOSS_KEYS)
        if unknown or not losses:
            raise ValueError(
                f"GroundingCriterion: losses {list(losses)} must be a non-empty subset of "
                f"{sorted(_LOSS_KEYS)}; unknown: {sorted(unknown)}."
            )
        bad_keys = sorted(k for k in weight_dict if not _WEIGHT_KEY.match(k))
        if bad_keys:
            raise ValueError(
                f"GroundingCriterion: weight_dict keys {bad_keys} are not loss names; use "
                "loss_class/loss_bbox/loss_giou, optionally with a suffix _<i>, _enc, _dn, _dn_<i>."
            )
        required = [k for name in losses for k in _LOSS_KEYS[name]]
        missing = [k for k in required if k not in weight_dict]
        if missing:
            raise ValueError(
                f"GroundingCriterion: weight_dict has no weight for {missing} (required for "
                f"losses={tuple(losses)}; got keys {sorted(weight_dict)})."
            )
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.losses = tuple(losses)

    def extra_repr(self) -> str:
        return f"losses={self.losses}, weight_dict={self.weight_dict}"

    # ------------------------------------------------------------------ single loss terms
    def loss_labels(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        text_mask: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Token focal loss.

        Args:
            outputs: "pred_logits" [B, Q, T] (``-inf`` allowed at invalid tokens).
            targets: list of B dicts with "positive_map" [N_b, T].
            indices: B pairs (query_idx, target_idx).
            num_boxes: normaliser.
            text_mask: [B, T] bool, True on valid tokens.
        """
        logits = outputs["pred_logits"]
        target = torch.zeros_like(logits, dtype=torch.float)
        for b, (q_idx, t_idx) in enumerate(indices):
            if len(q_idx):
                pos_map = targets[b]["positive_map"].to(logits.device)[t_idx.to(logits.device)]
                target[b, q_idx.to(logits.device)] = (pos_map > 0).float()
        # Select before any arithmetic so that -inf logits at padded tokens never enter.
        valid = text_mask[:, None, :].expand_as(logits)
        loss = sigmoid_focal_loss(
            logits[valid].float(),
            target[valid],
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        )
        return {"loss_class": loss / num_boxes}

    def loss_boxes(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        text_mask: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """L1 and GIoU losses of the matched boxes ("pred_boxes" [B, Q, 4], cxcywh)."""
        pred = outputs["pred_boxes"]
        src, tgt = [], []
        for b, (q_idx, t_idx) in enumerate(indices):
            src.append(pred[b, q_idx.to(pred.device)])
            tgt.append(targets[b]["boxes"].to(pred.device)[t_idx.to(pred.device)])
        src = torch.cat(src).float()
        tgt = torch.cat(tgt).float()
        if len(src) == 0:
            zero = pred.sum() * 0.0  # keeps the graph connected (DDP, empty batches)
            return {"loss_bbox": zero, "loss_giou": zero.clone()}
        loss_bbox = (src - tgt).abs().sum() / num_boxes
        loss_giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
        )
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou / num_boxes}

    # ------------------------------------------------------------------ helpers
    def _set_losses(self, outputs, targets, indices, num_boxes, text_mask, suffix=""):
        losses = {}
        for name in self.losses:
            fn = self.loss_labels if name == "labels" else self.loss_boxes
            for key, value in fn(outputs, targets, indices, num_boxes, text_mask).items():
                losses[key + suffix] = value * self._weight(key, key + suffix)
        return losses

    def _weight(self, base_key: str, key: str) -> float:
        return self.weight_dict.get(key, self.weight_dict[base_key])

    def _zero_losses(self, reference: torch.Tensor, suffix: str) -> Dict[str, torch.Tensor]:
        return {k + suffix: reference.sum() * 0.0 for name in self.losses for k in _LOSS_KEYS[name]}

    @staticmethod
    def _num_boxes(targets, device) -> float:
        num = torch.as_tensor(
            [float(sum(len(t["boxes"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num)
        return torch.clamp(num / world_size, min=1).item()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        outputs: Dict,
        targets: Sequence[Dict[str, torch.Tensor]],
        dn_meta: Optional[Dict] = None,
    ) -> Dict[str, torch.Tensor]:
        """Compute all losses.

        Args:
            outputs: the head outputs of docs/interfaces.md: "pred_logits" [B, Q, T],
                "pred_boxes" [B, Q, 4], "text_mask" [B, T], optionally "aux_outputs" (list of
                L - 1 dicts), "enc_outputs" (dict) and "dn_outputs" (dict with "pred_logits"
                [B, P, T], "pred_boxes" [B, P, 4], "aux_outputs").
            targets: list of B dicts with "boxes" [N_b, 4] (cxcywh normalised) and
                "positive_map" [N_b, T].
            dn_meta: the dict from :func:`~grounding_dino.modeling.denoising.prepare_for_cdn`
                (or None); ``outputs["dn_meta"]`` is used when not given.

        Returns:
            dict of weighted scalar losses. The denoising keys are always present (zeros when
            the batch had no denoising queries), so every process reports the same keys.
        """
        logits = outputs["pred_logits"]
        if "text_mask" not in outputs:
            raise KeyError("GroundingCriterion: outputs has no 'text_mask' [B, T] bool.")
        text_mask = outputs["text_mask"].to(device=logits.device, dtype=torch.bool)
        if text_mask.shape != (logits.shape[0], logits.shape[2]):
            raise ValueError(
                f"GroundingCriterion: text_mask {tuple(text_mask.shape)} does not match "
                f"pred_logits {tuple(logits.shape)} ([B, T] vs [B, Q, T])."
            )
        check_targets(targets, logits.shape[0], logits.shape[2])
        num_boxes = self._num_boxes(targets, logits.device)

        losses = {}
        layers = [(outputs, "")]
        layers += [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            layers.append((outputs["enc_outputs"], "_enc"))
        for layer_outputs, suffix in layers:
            indices = self.matcher(layer_outputs, targets)
            losses.update(
                self._set_losses(layer_outputs, targets, indices, num_boxes, text_mask, suffix)
            )

        dn_meta = dn_meta if dn_meta is not None else outputs.get("dn_meta")
        dn_outputs = outputs.get("dn_outputs")
        num_aux = len(outputs.get("aux_outputs", []))
        dn_suffixes = ["_dn"] + [f"_dn_{i}" for i in range(num_aux)]
        if dn_outputs is None or dn_meta is None:
            for suffix in dn_suffixes:
                losses.update(self._zero_losses(outputs["pred_boxes"], suffix))
            return losses
        dn_layers = [dn_outputs] + list(dn_outputs.get("aux_outputs", []))
        if len(dn_layers) != len(dn_suffixes):
            raise ValueError(
                f"GroundingCriterion: dn_outputs has {len(dn_layers) - 1} aux layers but outputs "
                f"has {num_aux}."
            )
        if list(dn_meta["num_targets"]) != [len(t["boxes"]) for t in targets]:
            raise ValueError(
                f"GroundingCriterion: dn_meta was built for {dn_meta['num_targets']} targets per "
                f"image but the targets have {[len(t['boxes']) for t in targets]}."
            )
        dn_indices = dn_match_indices(dn_meta, logits.device)
        dn_num_boxes = num_boxes * dn_meta["num_groups"]
        for layer_outputs, suffix in zip(dn_layers, dn_suffixes):
            losses.update(
                self._set_losses(
                    layer_outputs, targets, dn_indices, dn_num_boxes, text_mask, suffix
                )
            )
        return losses
