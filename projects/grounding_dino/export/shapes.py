"""The level layout of the image tokens in a form that traces with dynamic sizes.

The model computes ``spatial_shapes`` and ``level_start_index`` from Python sizes; traced, they
would be constants of the export image. The versions here read the maps' shapes as tensors
(``Shape`` ops in the graph) and give the same values. The modules downstream read the level
sizes from these tensors when their ``traceable`` switch is on (see
``grounding_dino.modeling.switches``).
"""

import dataclasses
from typing import List, Tuple

import torch

from ..modeling.structures import ImageTokens

__all__ = ["level_layout", "with_level_layout"]


def level_layout(maps: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``spatial_shapes`` [L, 2] long and ``level_start_index`` [L] long of per-level maps
    [B, C, H_l, W_l], computed from the maps' shapes as tensors (``Shape`` ops in a graph).
    """
    spatial_shapes = torch.stack([torch._shape_as_tensor(m)[-2:] for m in maps])
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def with_level_layout(image: ImageTokens, maps: List[torch.Tensor]) -> ImageTokens:
    """``image`` with the level layout of :func:`level_layout` (same values, traced)."""
    spatial_shapes, level_start_index = level_layout(maps)
    return dataclasses.replace(
        image, spatial_shapes=spatial_shapes, level_start_index=level_start_index
    )
