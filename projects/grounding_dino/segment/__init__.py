"""Grounded segmentation: a box-prompted segmenter (transformers' SAM, SAM-HQ, SAM 2) turns the
detector's boxes into masks (docs/segmentation.md)."""

from .stage import MaskOutput, MaskStage, add_instances_masks

__all__ = ["MaskStage", "MaskOutput", "add_instances_masks"]
