"""The references' padded-batch image side, for parity tests with the official and
transformers' code (the model runs images one size group at a time: ``forward_images``)."""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import Backbone

from grounding_dino.modeling.backbone import InputProjectionNeck

__all__ = ["forward_padded"]


def forward_padded(
    neck: InputProjectionNeck, backbone: Backbone, images: torch.Tensor, pixel_mask: torch.Tensor
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Runs body + ``neck`` on a padded batch the way the official and transformers' code do.

    Args:
        neck: the input projections.
        backbone: the body.
        images: [B, 3, H, W] normalised images.
        pixel_mask: [B, H, W] bool, True on valid pixels.

    Returns:
        maps: ``num_feature_levels`` maps [B, hidden_dim, H_l, W_l].
        masks: [B, H_l, W_l] bool, True on valid positions (the pixel mask resized by
            nearest interpolation).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if pixel_mask.shape != (images.shape[0],) + images.shape[-2:]:
        raise ValueError(
            f"pixel_mask shape {tuple(pixel_mask.shape)} does not match images "
            f"{tuple(images.shape)}"
        )
    maps = neck(list(backbone(images).values()))
    mask = pixel_mask[None].float()
    masks = [F.interpolate(mask, size=m.shape[-2:]).to(torch.bool)[0] for m in maps]
    return maps, masks
