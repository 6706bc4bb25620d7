"""The sampling kernels of multi-scale deformable attention, in pure PyTorch.

Every kernel takes ``value`` [B, S, heads, head_dim], ``spatial_shapes`` [L, 2] (h, w),
``level_start_index`` [L], ``sampling_locations`` [B, Q, heads, L, P, 2] in [0, 1] and
``attention_weights`` [B, Q, heads, L, P], and returns [B, Q, heads * head_dim]. All follow
``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a location
``(x, y)`` in ``[0, 1]`` maps to the pixel coordinate ``x * W - 0.5``, and corners outside the
map contribute zero.

- :func:`ms_deform_attn_embedding_bag` (the default): one weighted gather-and-sum over the
  rows of ``value`` (``embedding_bag``), in their natural layout.
- :func:`ms_deform_attn_grid_sample`: the classic per-level ``grid_sample`` (the reference).
- :func:`ms_deform_attn_gather`: the ONNX export kernel (plain gathers and a matmul; ONNX has
  no weighted ``EmbeddingBag``).
"""

from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .bilinear_sampling import sample_corners

__all__ = [
    "ms_deform_attn_embedding_bag",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_gather",
    "sample_pixels_embedding_bag",
    "padded_value_table",
    "sample_padded_table",
    "PaddedValueTable",
]


def _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, heads, head_dim], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [B, Q, heads, levels, points, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} does not match "
            f"sampling_locations shape {tuple(sampling_locations.shape)} without its last dim"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape != (sampling_locations.shape[3], 2):
        raise ValueError(
            f"spatial_shapes must be [levels={sampling_locations.shape[3]}, 2], "
            f"got shape {tuple(spatial_shapes.shape)}"
        )


def _level_sizes(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_values: int):
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    if sum(h * w for h, w in shapes) != num_values:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions but "
            f"value has {num_values}"
        )
    return shapes, starts


class PaddedValueTable(NamedTuple):
    """The values of all levels, each with a zero border (see :func:`padded_value_table`)."""

    table: torch.Tensor  # [B, total, M * D]
    shapes: List[Tuple[int, int]]  # (H_l, W_l)
    padded_starts: List[int]  # first row of each padded level
    num_heads: int


def padded_value_table(
    value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor
) -> PaddedValueTable:
    """Copies every level of ``value`` [B, S, M, D] into a zero border of 1 pixel on the
    top/left and 2 on the bottom/right: both corners of a coordinate clamped to [-1, W] then
    lie in the table, and corners outside the map read zeros, as grid_sample's zero padding.
    Built once, it serves any number of query chunks (:func:`sample_padded_table`)."""
    batch, num_values, num_heads, head_dim = value.shape
    shapes, starts = _level_sizes(spatial_shapes, level_start_index, num_values)
    padded_starts, total = [], 0
    for h, w in shapes:
        padded_starts.append(total)
        total += (h + 3) * (w + 3)
    if any(start != sum(h * w for h, w in shapes[:i]) for i, start in enumerate(starts)):
        raise ValueError(f"level_start_index {starts} does not follow spatial_shapes {shapes}")
    # Split, pad and concatenate rather than assign into a zero table: the backward of a slice
    # assignment clones the whole table's gradient once per level, that of pad and cat only
    # takes views (the same values: pure data movement).
    levels = value.flatten(2).split([h * w for h, w in shapes], dim=1)
    table = torch.cat(
        [
            F.pad(level.view(batch, h, w, -1), (0, 0, 1, 2, 1, 2)).view(batch, -1, level.shape[-1])
            for level, (h, w) in zip(levels, shapes)
        ],
        dim=1,
    )
    return PaddedValueTable(table, shapes, padded_starts, num_heads)


def sample_pixels_embedding_bag(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted bilinear sampling at pixel coordinates, as one ``embedding_bag``.

    Args:
        value: [B, S, M, D] projected values of all levels (M heads, D channels per head).
        spatial_shapes: [L, 2] long, (H_l, W_l) of each level.
        level_start_index: [L] long, first row of each level in S.
        x, y: [B, Q, M, L, P] pixel coordinates (pixel centres at integers, i.e.
            ``location * size - 0.5``).
        attention_weights: [B, Q, M, L, P].

    Returns:
        [B, Q, M*D] the weighted sums, heads concatenated.
    """
    table = padded_value_table(value, spatial_shapes, level_start_index)
    return sample_padded_table(table, x, y, attention_weights)


def sample_padded_table(
    padded: PaddedValueTable,
    x: torch.Tensor,
    y: torch.Tensor,
    attention_weights: torch.Tensor,
    rebuild=None,
) -> torch.Tensor:
    """:func:`sample_pixels_embedding_bag` from a :func:`padded_value_table`.

    Args:
        padded: the values' table.
        x, y: [B, Q, M, L, P] pixel coordinates.
        attention_weights: [B, Q, M, L, P].
        rebuild: optional, see :func:`.bilinear_sampling.sample_corners`.

    Returns:
        [B, Q, M*D]. In training the backward keeps only the table (or what ``rebuild``
        rebuilds it from), coordinates and weights (:mod:`.bilinear_sampling`).
    """
    return sample_corners(padded, x, y, attention_weights, rebuild)


def ms_deform_attn_embedding_bag(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable sampling as one weighted ``embedding_bag`` over the value rows.

    Args:
        value: [B, S, M, D] projected values of all levels (M heads, D channels per head).
        spatial_shapes: [L, 2] long, (H_l, W_l) of each level.
        level_start_index: [L] long, first row of each level in S.
        sampling_locations: [B, Q, M, L, P, 2] normalised (x, y) in [0, 1].
        attention_weights: [B, Q, M, L, P] weights (softmax over L*P per head).

    Returns:
        [B, Q, M*D] the attended values, heads concatenated.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    size = spatial_shapes.to(sampling_locations.dtype)
    x = sampling_locations[..., 0] * size[:, 1:2] - 0.5
    y = sampling_locations[..., 1] * size[:, 0:1] - 0.5
    return sample_pixels_embedding_bag(
        value, spatial_shapes, level_start_index, x, y, attention_weights
    )


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable sampling with one ``grid_sample`` per level (the reference formulation).

    Args and returns as :func:`ms_deform_attn_embedding_bag`.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    batch, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    grids = 2 * sampling_locations - 1
    out = value.new_zeros(batch * num_heads, head_dim, num_queries)
    # Level sizes and starts are read as tensors, not Python ints, so that a traced graph
    # (ONNX export) keeps them as inputs of the slicing and reshapes: one graph serves every
    # image size.
    for level, (start, (h, w)) in enumerate(
        zip(level_start_index.unbind(0), (s.unbind(0) for s in spatial_shapes.unbind(0)))
    ):
        # [B, h*w, M, D] -> [B*M, D, h, w]
        value_l = value[:, start : start + h * w].permute(0, 2, 3, 1)
        value_l = value_l.reshape(batch * num_heads, head_dim, h, w)
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B*M, D, Q, P]
        weights_l = attention_weights[:, :, :, level].transpose(1, 2).flatten(0, 1)
        out += (sampled * weights_l.unsqueeze(1)).sum(-1)
    return out.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable sampling as four row gathers per level (one per bilinear corner).

    The export kernel: plain ``Gather``, ``Mul`` and ``ReduceSum`` in a graph, which ONNX
    Runtime runs several times faster than its ``GridSample``. Level sizes are read as
    tensors, so a traced graph serves every image size. Args and returns as
    :func:`ms_deform_attn_embedding_bag`.
    """
    _check_sampling_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    batch, _, num_heads, head_dim = value.shape
    num_queries, num_points = sampling_locations.shape[1], sampling_locations.shape[4]
    rows = batch * num_heads
    out = value.new_zeros(rows, num_queries, head_dim)
    # [B*M, 1, 1] offset of each (batch, head) block in the flattened per-level table
    for level, (start, (h, w)) in enumerate(
        zip(level_start_index.unbind(0), (s.unbind(0) for s in spatial_shapes.unbind(0)))
    ):
        # [B, h*w, M, D] -> [B*M, h*w + 1, D]: each (batch, head) block ends in a zero row that
        # corners outside the map read (grid_sample's zero padding).
        level_value = value[:, start : start + h * w].permute(0, 2, 1, 3)
        level_value = level_value.reshape(rows, h * w, head_dim)
        table = torch.cat([level_value, level_value.new_zeros(rows, 1, head_dim)], 1)
        block = (torch.arange(rows, device=value.device) * (h * w + 1)).view(rows, 1, 1)
        # [B, Q, M, P] -> [B*M, Q, P]
        locations = sampling_locations[:, :, :, level].permute(0, 2, 1, 3, 4)
        locations = locations.reshape(rows, num_queries, num_points, 2)
        weights = attention_weights[:, :, :, level].permute(0, 2, 1, 3)
        weights = weights.reshape(rows, num_queries, num_points)
        x = locations[..., 0] * w - 0.5
        y = locations[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        indices, corner_weights = [], []
        for dx, dy, corner in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            indices.append(torch.where(inside, yi * w + xi, h * w))
            corner_weights.append(corner * weights)
        # One gather of the 4 corners x P points of every query, one weighted sum (a matmul).
        index = torch.cat(indices, -1).to(torch.int64) + block  # [B*M, Q, 4P]
        sampled = table.reshape(-1, head_dim).index_select(0, index.reshape(-1))
        sampled = sampled.view(rows, num_queries, 4 * num_points, head_dim)
        corner_weights = torch.cat(corner_weights, -1).unsqueeze(-2)  # [B*M, Q, 1, 4P]
        out = out + torch.matmul(corner_weights, sampled).squeeze(-2)
    return out.view(batch, num_heads, num_queries, head_dim).transpose(1, 2).flatten(2)
