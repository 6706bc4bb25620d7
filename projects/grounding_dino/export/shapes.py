"""Shape-dependent helpers of the transformer in a form that traces with dynamic sizes.

``encoder_reference_points`` (the enhancer) and ``encoder_proposals`` (the query selector)
loop over ``spatial_shapes.tolist()``: traced, the level sizes become constants of the export
image. The versions here read the sizes as tensors and give the same values (``arange + 0.5``
equals ``linspace(0.5, n - 0.5, n)`` exactly, as the step is 1); the proposals run the query
selector's own body (``proposals_for_levels``) on those sizes. :func:`dynamic_shape_helpers`
installs them in their modules while exporting and restores the originals afterwards.
"""

import contextlib
from typing import Iterator, List, Tuple

import torch

from ..modeling import enhancer as enhancer_module
from ..modeling import query_selector as selector_module
from ..modeling.structures import ImageTokens

__all__ = ["dynamic_shape_helpers", "level_layout", "encoder_reference_points", "encoder_proposals"]


def _level_sizes(spatial_shapes: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(row.unbind(0)) for row in spatial_shapes.unbind(0)]


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
    image.spatial_shapes = spatial_shapes
    image.level_start_index = level_start_index
    return image


def encoder_reference_points(spatial_shapes, valid_ratios) -> torch.Tensor:
    """As ``modeling.enhancer.encoder_reference_points``, sizes read as tensors."""
    points = []
    for level, (height, width) in enumerate(_level_sizes(spatial_shapes)):
        ys = torch.arange(height, device=valid_ratios.device).to(torch.float32) + 0.5
        xs = torch.arange(width, device=valid_ratios.device).to(torch.float32) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def encoder_proposals(memory, image_mask, spatial_shapes):
    """As ``modeling.query_selector.encoder_proposals``, sizes read as tensors."""
    return selector_module.proposals_for_levels(memory, image_mask, _level_sizes(spatial_shapes))


@contextlib.contextmanager
def dynamic_shape_helpers() -> Iterator[None]:
    """Installs the traceable helpers in the enhancer and query selector modules, restoring
    the originals afterwards, also when the body raises."""
    saved = (enhancer_module.encoder_reference_points, selector_module.encoder_proposals)
    try:
        enhancer_module.encoder_reference_points = encoder_reference_points
        selector_module.encoder_proposals = encoder_proposals
        yield
    finally:
        enhancer_module.encoder_reference_points, selector_module.encoder_proposals = saved
