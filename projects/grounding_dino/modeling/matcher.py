"""Hungarian matching of decoder queries to grounded targets.

The class cost is GLIP / Open-GroundingDino's token-level focal cost: a target is a
(normalised) positive map over caption tokens rather than a class id, so the per-token focal
costs of a query are averaged with the target's positive map as weights.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "check_targets", "normalize_positive_map"]


def normalize_positive_map(positive_map: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-normalise a positive map so that each target's token weights sum to 1.

    Args:
        positive_map: float [N, T], non-negative token weights per target.
        eps: rows summing to less than this (targets whose tokens were truncated away) stay
            all-zero instead of dividing by zero.

    Returns:
        float [N, T].
    """
    positive_map = positive_map.float()
    return positive_map / positive_map.sum(-1, keepdim=True).clamp(min=eps)


def check_targets(targets: Sequence[Dict[str, torch.Tensor]], batch_size: int, num_tokens: int):
    """Raise a clear error when the criterion's targets break the contract.

    Args:
        targets: list of B dicts with "boxes" [N, 4] (cxcywh, normalised) and
            "positive_map" [N, T].
        batch_size: B of the model outputs.
        num_tokens: T, the width of the model's token logits.
    """
    if len(targets) != batch_size:
        raise ValueError(f"Got {len(targets)} target dicts for a batch of {batch_size} images.")
    for i, t in enumerate(targets):
        for key in ("boxes", "positive_map"):
            if key not in t:
                raise KeyError(f"targets[{i}] has no '{key}' (keys: {sorted(t.keys())}).")
        boxes, pos = t["boxes"], t["positive_map"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be [N, 4], got {tuple(boxes.shape)}.")
        if pos.dim() != 2 or pos.shape[0] != boxes.shape[0] or pos.shape[1] != num_tokens:
            raise ValueError(
                f"targets[{i}]['positive_map'] must be [N={boxes.shape[0]}, T={num_tokens}] "
                f"to match the boxes and the model's token logits, got {tuple(pos.shape)}."
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, image by image.

    cost = cost_class * C_focal + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy), where
    ``C_focal[q, t] = sum_k (pos_cost[q, k] - neg_cost[q, k]) * positive_map[t, k]`` with
    ``pos_cost = alpha (1 - p)^gamma (-log p)``, ``neg_cost = (1 - alpha) p^gamma (-log(1 - p))``
    and ``p = sigmoid(logit)``. Padded tokens (``-inf`` logits) carry zero weight in every
    positive map, so they never enter the cost.
    """

    def __init__(
        self,
        *,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        focal_alpha: float,
        focal_gamma: float,
    ):
        """
        Args:
            cost_class: weight of the token focal cost.
            cost_bbox: weight of the L1 distance between cxcywh boxes.
            cost_giou: weight of the negative generalised IoU.
            focal_alpha, focal_gamma: focal cost parameters.
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0.")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        tgt_boxes: torch.Tensor,
        tgt_map: torch.Tensor,
    ) -> torch.Tensor:
        """Matching cost of one image.

        Args:
            logits: [Q, T] query-token logits (``-inf`` allowed at padded tokens).
            boxes: [Q, 4] predicted boxes, cxcywh in [0, 1].
            tgt_boxes: [N, 4] target boxes, cxcywh in [0, 1].
            tgt_map: [N, T] target positive maps.

        Returns:
            float [Q, N] cost.
        """
        tgt_map = normalize_positive_map(tgt_map)
        # Only the tokens some target covers contribute; skip the other columns.
        used = (tgt_map > 0).any(0)
        prob = logits[:, used].float().sigmoid()
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        cost_class = (pos_cost - neg_cost) @ tgt_map[:, used].T
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return (
            self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: dict with "pred_logits" [B, Q, T] and "pred_boxes" [B, Q, 4] (cxcywh).
            targets: list of B dicts with "boxes" [N_b, 4] (cxcywh, normalised) and
                "positive_map" [N_b, T].

        Returns:
            list of B pairs (query_idx, target_idx), long tensors of length min(Q, N_b) on the
            CPU; query_idx is sorted. Images without targets give two empty tensors.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries, num_tokens = logits.shape
        check_targets(targets, bs, num_tokens)
        indices = []
        for b, t in enumerate(targets):
            if len(t["boxes"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], t["boxes"], t["positive_map"]).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite matching cost for image {b}; the predicted "
                    "boxes or logits contain NaN/inf (training has likely diverged)."
                )
            q_idx, t_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (
                    torch.as_tensor(q_idx, dtype=torch.int64),
                    torch.as_tensor(t_idx, dtype=torch.int64),
                )
            )
        return indices
