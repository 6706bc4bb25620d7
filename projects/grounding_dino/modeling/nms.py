"""Class-wise non-maximum suppression of detections (torchvision's ``batched_nms``).

Grounding DINO has no NMS of its own: several queries may find the same object, and a
category prompt scores every (query, category) pair, so the same box may come back under one
class several times. Post-processing removes such duplicates here when the call's
``InferenceSettings.nms_threshold`` asks for it (the labeller's and the demos' ``--nms``), per
class (or per phrase for captions).
"""

from typing import Optional

import torch
from torchvision.ops import batched_nms

__all__ = ["classwise_nms"]


def classwise_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    max_detections: Optional[int] = None,
) -> torch.Tensor:
    """
    Indices of the detections kept by class-wise NMS, best score first.

    Args:
        boxes: [N, 4] xyxy boxes.
        scores: [N] scores.
        classes: [N] integer classes; boxes of different classes never suppress each other.
        iou_threshold: a box is dropped when its IoU with a better box of its class is above
            this; 0 (or less) turns NMS off (the detections are only sorted and capped).
        max_detections: keep at most this many (the best ones); None keeps all.

    Returns:
        [K] long indices into the N detections, by decreasing score (ties keep their order).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got shape {tuple(boxes.shape)}")
    if not (scores.shape == classes.shape == boxes.shape[:1]):
        raise ValueError(
            f"{boxes.shape[0]} boxes but scores {tuple(scores.shape)} and classes "
            f"{tuple(classes.shape)}"
        )
    if iou_threshold > 1:
        raise ValueError(f"the NMS IoU threshold must be in [0, 1], got {iou_threshold}")
    if max_detections is not None and max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    if iou_threshold > 0:
        # batched_nms returns the kept indices by decreasing score.
        keep = batched_nms(boxes.float(), scores.float(), classes, iou_threshold)
    else:
        keep = scores.argsort(descending=True, stable=True)
    if max_detections is not None:
        keep = keep[:max_detections]
    return keep
