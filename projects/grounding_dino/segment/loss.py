"""
The mask loss of SAM (Kirillov et al. 2023, section 3 and appendix A): focal and dice losses on
the mask logits, weighted 20:1, and the mean squared error between the IoU head's prediction
and the actual IoU of the predicted mask with the ground truth.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

__all__ = ["dice_loss", "mask_iou", "sam_mask_losses"]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """
    Dice loss of each mask, ``1 - (2 |p t| + s) / (|p| + |t| + s)`` with ``p = sigmoid(logits)``.

    Args:
        logits: (K, h, w) mask logits.
        targets: (K, h, w) target masks in [0, 1].

    Returns:
        (K,) losses.
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = (probs * targets).sum(1)
    return 1.0 - (2.0 * overlap + smooth) / (probs.sum(1) + targets.sum(1) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """
    IoU of each predicted mask (``logits > 0``) with its target (``targets >= 0.5``).

    Args:
        logits: (K, h, w); targets: (K, h, w) in [0, 1].

    Returns:
        (K,) float IoUs; 1 where both masks are empty.
    """
    pred = (logits > 0).flatten(1)
    gt = (targets >= 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_mask_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    iou_predictions: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
) -> Dict[str, torch.Tensor]:
    """
    SAM's losses, averaged over the K masks of the batch.

    Args:
        logits: (K, h, w) mask logits (one mask per box prompt).
        targets: (K, h, w) ground truth masks in [0, 1] at the logits' resolution (soft at the
            edges where they were downsampled).
        iou_predictions: (K,) the IoU head's predictions for these masks.
        focal_weight, dice_weight, iou_weight: the weights (SAM: 20, 1, 1).
        focal_alpha: the focal loss's weight of the mask pixels (the others get
            ``1 - focal_alpha``; < 0: no weighting).

    Returns:
        {"loss_mask_focal", "loss_mask_dice", "loss_mask_iou"}: weighted scalar losses.
    """
    if logits.shape != targets.shape or logits.shape[0] != iou_predictions.shape[0]:
        raise ValueError(
            f"sam_mask_losses: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and "
            f"IoU predictions {tuple(iou_predictions.shape)} do not describe the same K masks"
        )
    targets = targets.to(logits.dtype)
    focal = sigmoid_focal_loss(logits, targets, alpha=focal_alpha, gamma=2.0, reduction="none")
    true_iou = mask_iou(logits.detach(), targets)
    return {
        "loss_mask_focal": focal_weight * focal.flatten(1).mean(1).mean(),
        "loss_mask_dice": dice_weight * dice_loss(logits, targets).mean(),
        "loss_mask_iou": iou_weight * F.mse_loss(iou_predictions.float(), true_iou),
    }
