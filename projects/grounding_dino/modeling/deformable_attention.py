"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

The module has the parameter names of the official and the Hugging Face implementations
(``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``), so their
weights load one to one. Nothing here is compiled: the sampling runs on any device.

The default kernel (:func:`ms_deform_attn_embedding_bag`) folds the bilinear corner weights
and the attention weights into one weighted gather-and-sum,
:func:`torch.nn.functional.embedding_bag` over the rows of ``value``. It reads the values in
their natural ``[B, S, heads, head_dim]`` layout, so it needs no per-level transposes, no
stack of per-level samples and no ``[B*heads, D, Q, points]`` intermediate. It is
differentiable with respect to the values, the sampling locations and the attention
weights. :func:`ms_deform_attn_grid_sample` is the classic per-level ``grid_sample``
formulation (the reference), kept for comparison and for devices without ``embedding_bag``
support of per-sample weights. :func:`ms_deform_attn_gather` is the ONNX export kernel (ONNX
has no weighted ``EmbeddingBag``, and ONNX Runtime's ``GridSample`` is ~4x slower than its
plain gathers): the exporter switches every module to it with :func:`deformable_kernel`.

Both follow ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``:
a location ``(x, y)`` in ``[0, 1]`` maps to the pixel coordinate ``x * W - 0.5``, and
corners outside the map contribute zero.
"""

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .weighted_gather import weighted_gather

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn_embedding_bag",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_gather",
    "sample_pixels_embedding_bag",
    "deformable_kernel",
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
            ``location * size - 0.5``). They may be overwritten.
        attention_weights: [B, Q, M, L, P].

    Returns:
        [B, Q, M*D] the weighted sums, heads concatenated.
    """
    batch, num_values, num_heads, head_dim = value.shape
    num_queries = x.shape[1]
    shapes, starts = _level_sizes(spatial_shapes, level_start_index, num_values)
    device, dtype = value.device, x.dtype

    # Copy every level into a zero border of 1 pixel on the top/left and 2 on the
    # bottom/right: both corners of a coordinate clamped to [-1, W] then lie in the
    # table, and corners outside the map read zeros, as grid_sample's zero padding.
    padded_starts, total = [], 0
    for h, w in shapes:
        padded_starts.append(total)
        total += (h + 3) * (w + 3)
    table = value.new_zeros(batch, total, num_heads * head_dim)
    for (h, w), start, pstart in zip(shapes, starts, padded_starts):
        level = table[:, pstart : pstart + (h + 3) * (w + 3)].view(batch, h + 3, w + 3, -1)
        level[:, 1 : h + 1, 1 : w + 1] = value[:, start : start + h * w].view(batch, h, w, -1)

    size = torch.tensor(shapes, dtype=dtype, device=device)
    height = size[:, 0:1]  # [L, 1] broadcasts against [B, Q, M, L, P]
    width = size[:, 1:2]
    # Beyond [-1, W] all corners are outside and weigh nothing, as at -1 or W exactly.
    minus_one = size.new_tensor(-1.0)
    x = torch.clamp(x, min=minus_one, max=width)
    y = torch.clamp(y, min=minus_one, max=height)
    x0 = x.floor()
    y0 = y.floor()
    fx = x - x0
    fy = y - y0

    # Row of table.view(-1, D) of the top-left corner, within one batch element:
    # (start_l + (y0 + 1) * (W_l + 3) + (x0 + 1)) * M + m. Exact in float32 below 2**24.
    rows_per_image = total * num_heads
    index_dtype = torch.int32 if batch * rows_per_image < 2**31 else torch.int64
    exact = torch.float32 if rows_per_image < 2**24 else torch.float64
    padded_width = torch.tensor([w + 3 for _, w in shapes], dtype=exact, device=device)
    offset = (
        (torch.tensor(padded_starts, dtype=exact, device=device) + padded_width + 1) * num_heads
    ).view(1, 1, 1, -1, 1) + torch.arange(num_heads, dtype=exact, device=device).view(
        1, 1, -1, 1, 1
    )  # [1, 1, M, L, 1]
    top_left = y0.to(exact) * (padded_width * num_heads).view(-1, 1)
    top_left.add_(x0.to(exact), alpha=num_heads).add_(offset)
    # Corner offsets (tl, tr, bl, br) per level plus the batch offset: [B, 1, 1, L, 1, 4].
    row = (padded_width * num_heads).to(index_dtype).view(-1, 1, 1)
    corners = torch.cat([row * 0, row * 0 + num_heads, row, row + num_heads], dim=-1)
    batch_offset = torch.arange(batch, dtype=index_dtype, device=device) * rows_per_image
    corners = corners + batch_offset.view(batch, 1, 1, 1, 1, 1)
    rows = top_left.to(index_dtype).unsqueeze(-1) + corners  # [B, Q, M, L, P, 4]

    fy_a = fy * attention_weights
    wy0 = attention_weights - fy_a
    wx0 = 1 - fx
    if any(t.requires_grad for t in (wy0, fy_a, wx0, fx)):
        weights = torch.stack((wy0 * wx0, wy0 * fx, fy_a * wx0, fy_a * fx), dim=-1)
    else:  # inference: write the four products in place, no temporaries
        weights = wy0.new_empty(wy0.shape + (4,))
        torch.mul(wy0, wx0, out=weights[..., 0])
        torch.mul(wy0, fx, out=weights[..., 1])
        torch.mul(fy_a, wx0, out=weights[..., 2])
        torch.mul(fy_a, fx, out=weights[..., 3])

    out = weighted_gather(
        table.view(batch * rows_per_image, head_dim),
        rows.view(batch * num_queries * num_heads, -1),
        weights.view(batch * num_queries * num_heads, -1).to(value.dtype),
        batch,
        num_heads,
    )
    return out.view(batch, num_queries, num_heads * head_dim)


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


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR).

    Each query predicts ``num_points`` sampling offsets per head and level around its
    reference point, samples the projected values bilinearly there and sums them with
    softmax weights.
    """

    _KERNELS = {
        "embedding_bag": ms_deform_attn_embedding_bag,
        "grid_sample": ms_deform_attn_grid_sample,
        "gather": ms_deform_attn_gather,
    }

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        kernel: str = "embedding_bag",
    ):
        """
        Args:
            embed_dim: channels C of queries and values.
            num_heads: attention heads M; C must be divisible by M.
            num_levels: feature levels L.
            num_points: sampling points P per head and level.
            kernel: the sampling implementation, not a model setting (both give the same
                values): ``"embedding_bag"`` (fastest on CPU) or ``"grid_sample"`` (the
                reference formulation, for devices without ``embedding_bag``'s per-sample
                weights).
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if kernel not in self._KERNELS:
            raise ValueError(f"kernel must be one of {sorted(self._KERNELS)}, got {kernel!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.kernel = kernel
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR's initialisation: offsets start on a ring of directions per head."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _locations(self, query, reference_points, spatial_shapes) -> torch.Tensor:
        """[B, Q, M, L, P, 2] normalised sampling locations, as the reference computes them."""
        batch, num_queries, _ = query.shape
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
            return reference_points[:, :, None, :, None, :] + offsets / normalizer
        ref = reference_points[:, :, None, :, None, :]
        return ref[..., :2] + offsets / self.num_points * ref[..., 2:] * 0.5

    def _pixel_locations(self, query, reference_points, spatial_shapes):
        """Sampling locations directly in pixels (``location * size - 0.5``).

        The offset projection's rows are reordered so that x and y offsets come out as
        separate [B, Q, M, L, P] blocks; the reference point terms are per (query, level).

        Returns:
            x, y: [B, Q, M, L, P] pixel coordinates.
        """
        batch, num_queries, channels = query.shape
        m, n_lvl, p = self.num_heads, self.num_levels, self.num_points
        weight = self.sampling_offsets.weight.view(m, n_lvl, p, 2, channels)
        weight = weight.permute(3, 0, 1, 2, 4).reshape(-1, channels)
        bias = self.sampling_offsets.bias.view(m, n_lvl, p, 2).permute(3, 0, 1, 2).reshape(-1)
        off_x, off_y = (
            F.linear(query, weight, bias).view(batch, num_queries, 2, m, n_lvl, p).unbind(2)
        )
        size = spatial_shapes.to(query.dtype)
        height, width = size[:, 0], size[:, 1]  # [L]
        ref = reference_points
        base_x = (ref[..., 0] * width - 0.5)[:, :, None, :, None]  # [B, Q, 1, L, 1]
        base_y = (ref[..., 1] * height - 0.5)[:, :, None, :, None]
        if ref.shape[-1] == 2:
            return off_x + base_x, off_y + base_y
        scale_x = (ref[..., 2] * width * (0.5 / p))[:, :, None, :, None]
        scale_y = (ref[..., 3] * height * (0.5 / p))[:, :, None, :, None]
        return torch.addcmul(base_x, off_x, scale_x), torch.addcmul(base_y, off_y, scale_y)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Q, C] queries (position embedding already added).
            reference_points: [B, Q, L, 2] normalised (x, y) points, or [B, Q, L, 4]
                normalised (cx, cy, w, h) boxes (offsets then scale with the box size).
            value: [B, S, C] flattened features of all levels, S = sum_l H_l * W_l.
            spatial_shapes: [L, 2] long, (H_l, W_l) of each level.
            level_start_index: [L] long, offset of each level in S.
            value_mask: optional [B, S] bool, True on valid positions; padded values are
                zeroed before sampling.

        Returns:
            [B, Q, C] attended features.
        """
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        num_levels, num_heads, num_points = self.num_levels, self.num_heads, self.num_points
        if spatial_shapes.shape != (num_levels, 2):
            raise ValueError(
                f"spatial_shapes must be [{num_levels}, 2], got {tuple(spatial_shapes.shape)}"
            )
        if reference_points.shape[:3] != (batch, num_queries, num_levels):
            raise ValueError(
                f"reference_points must be [{batch}, {num_queries}, {num_levels}, 2 or 4], "
                f"got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must end in 2 (points) or 4 (boxes), got "
                f"{reference_points.shape[-1]}"
            )

        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask[..., None], 0.0)
        value = value.view(batch, num_values, num_heads, self.embed_dim // num_heads)

        weights = self.attention_weights(query).view(
            batch, num_queries, num_heads, num_levels * num_points
        )
        weights = weights.softmax(-1).view(batch, num_queries, num_heads, num_levels, num_points)
        if self.kernel == "embedding_bag":
            x, y = self._pixel_locations(query, reference_points, spatial_shapes)
            out = sample_pixels_embedding_bag(
                value, spatial_shapes, level_start_index, x, y, weights
            )
        else:
            locations = self._locations(query, reference_points, spatial_shapes)
            out = self._KERNELS[self.kernel](
                value, spatial_shapes, level_start_index, locations, weights
            )
        return self.output_proj(out)


@contextlib.contextmanager
def deformable_kernel(model: nn.Module, kernel: str) -> Iterator[nn.Module]:
    """
    Temporarily sets the sampling kernel of every :class:`MultiScaleDeformableAttention` in
    ``model`` (e.g. ``"grid_sample"`` while exporting to ONNX), restoring each module's own
    kernel afterwards, also when the body raises. Both kernels give the same values.

    Raises:
        ValueError: ``kernel`` is not a known kernel (nothing is changed).
    """
    if kernel not in MultiScaleDeformableAttention._KERNELS:
        raise ValueError(
            f"kernel must be one of {sorted(MultiScaleDeformableAttention._KERNELS)}, "
            f"got {kernel!r}"
        )
    modules = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    saved = [m.kernel for m in modules]
    try:
        for module in modules:
            module.kernel = kernel
        yield model
    finally:
        for module, previous in zip(modules, saved):
            module.kernel = previous
