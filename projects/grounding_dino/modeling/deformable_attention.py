"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

The module has the parameter names of the official and the Hugging Face implementations
(``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``), so their
weights load one to one. The sampling is PyTorch and runs on any device; only the training
backward on the CPU has a compiled helper, built on first use where a C compiler exists and
replaced by PyTorch where not (:mod:`.native_kernels`, :mod:`.weighted_gather`).

The default kernel (:func:`ms_deform_attn_embedding_bag`) folds the bilinear corner weights
and the attention weights into one weighted gather-and-sum,
:func:`torch.nn.functional.embedding_bag` over the rows of ``value``. It reads the values in
their natural ``[B, S, heads, head_dim]`` layout, so it needs no per-level transposes, no
stack of per-level samples and no ``[B*heads, D, Q, points]`` intermediate. It is
differentiable with respect to the values, the sampling locations and the attention
weights. :func:`ms_deform_attn_grid_sample` is the classic per-level ``grid_sample``
formulation (the reference), kept for comparison and for devices without ``embedding_bag``
support of per-sample weights. :func:`ms_deform_attn_gather` is the ONNX export kernel (ONNX
has no weighted ``EmbeddingBag``, and ONNX Runtime's ``GridSample`` is slower than its plain
gathers): the exporter switches every module to it with :func:`deformable_kernel`.

The kernels live in :mod:`.deformable_kernels`.
"""

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .deformable_kernels import (
    ms_deform_attn_embedding_bag,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
    padded_value_table,
    sample_padded_table,
    sample_pixels_embedding_bag,
)
from .recomputed_linear import can_recompute, sum_linear
from .switches import switched
from .utils import linear_weight, rowwise_in_chunks

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn_embedding_bag",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_gather",
    "sample_pixels_embedding_bag",
    "deformable_kernel",
]

# Queries per chunk of the inference sampling (rowwise_in_chunks): the enhancer has one query
# per image token (22223 at 800x1333).
QUERY_CHUNK = 2048


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

    def _pixel_locations(self, query, reference_points, spatial_shapes, query_pos=None):
        """Sampling locations directly in pixels (``location * size - 0.5``).

        The offset projection's rows are reordered so that x and y offsets come out as
        separate [B, Q, M, L, P] blocks; the reference point terms are per (query, level).

        Returns:
            x, y: [B, Q, M, L, P] pixel coordinates.
        """
        batch, num_queries, channels = query.shape
        m, n_lvl, p = self.num_heads, self.num_levels, self.num_points
        weight = linear_weight(self.sampling_offsets).view(m, n_lvl, p, 2, channels)
        weight = weight.permute(3, 0, 1, 2, 4).reshape(-1, channels)
        bias = self.sampling_offsets.bias.view(m, n_lvl, p, 2).permute(3, 0, 1, 2).reshape(-1)
        off_x, off_y = (
            _linear(query, query_pos, weight, bias)
            .view(batch, num_queries, 2, m, n_lvl, p)
            .unbind(2)
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
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Q, C] queries (with their position embedding added, or with
                ``query_pos`` given).
            reference_points: [B, Q, L, 2] normalised (x, y) points, or [B, Q, L, 4]
                normalised (cx, cy, w, h) boxes (offsets then scale with the box size).
            value: [B, S, C] flattened features of all levels, S = sum_l H_l * W_l.
            spatial_shapes: [L, 2] long, (H_l, W_l) of each level.
            level_start_index: [L] long, offset of each level in S.
            value_mask: optional [B, S] bool, True on valid positions; padded values are
                zeroed before sampling.
            query_pos: optional [B, Q, C] position embedding added to ``query``. In training
                the sum is not kept for the backward (:func:`.recomputed_linear.sum_linear`).

        Returns:
            [B, Q, C] attended features.
        """
        batch, num_queries, _ = query.shape
        num_levels = self.num_levels
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

        training = self.training and torch.is_grad_enabled()
        if query_pos is not None and not (training and self.kernel == "embedding_bag"):
            query, query_pos = query + query_pos, None
        if self.kernel == "embedding_bag":
            table = self._value_table(value, value_mask, spatial_shapes, level_start_index)
            rebuild = None
            if training and self._rebuildable():
                # The backward projects the values again instead of keeping the table.
                sources = (value, value_mask, spatial_shapes, level_start_index)
                rebuild = (self._rebuilt_table, sources)

            def attend(query, reference_points):
                x, y = self._pixel_locations(query, reference_points, spatial_shapes, query_pos)
                weights = self._weights(query, query_pos)
                return self.output_proj(sample_padded_table(table, x, y, weights, rebuild))

            if training:
                return attend(query, reference_points)
            # Inference: every query samples on its own; chunks of queries keep the
            # [B, Q, M, L, P, 4] corner tensors small (see rowwise_in_chunks).
            return rowwise_in_chunks(attend, query, QUERY_CHUNK, reference_points)
        value = self._projected_values(value, value_mask)
        locations = self._locations(query, reference_points, spatial_shapes)
        out = self._KERNELS[self.kernel](
            value, spatial_shapes, level_start_index, locations, self._weights(query)
        )
        return self.output_proj(out)

    def _projected_values(self, value, value_mask) -> torch.Tensor:
        """[B, S, C] -> [B, S, M, D] projected values, zero where ``value_mask`` is False."""
        batch, num_values, _ = value.shape
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask[..., None], 0.0)
        return value.view(batch, num_values, self.num_heads, self.embed_dim // self.num_heads)

    def _value_table(self, value, value_mask, spatial_shapes, level_start_index):
        """[B, S, C] -> the projected values' ``PaddedValueTable``."""
        value = self._projected_values(value, value_mask)
        return padded_value_table(value, spatial_shapes, level_start_index)

    def _rebuilt_table(self, value, value_mask, spatial_shapes, level_start_index):
        return self._value_table(value, value_mask, spatial_shapes, level_start_index).table

    def _rebuildable(self) -> bool:
        # A wrapped projection (LoRA, with its own dropout) may not give the same values twice.
        return type(self.value_proj) is nn.Linear and can_recompute()

    def _weights(self, query: torch.Tensor, query_pos=None) -> torch.Tensor:
        """[B, Q, C] (and its position embedding or None) -> [B, Q, M, L, P] attention weights
        (softmax over L * P per head)."""
        batch, num_queries, _ = query.shape
        m, n_lvl, p = self.num_heads, self.num_levels, self.num_points
        layer = self.attention_weights
        if query_pos is None:
            logits = layer(query)
        elif type(layer) is nn.Linear:
            logits = sum_linear(query, query_pos, layer.weight, layer.bias)
        else:  # a wrapped layer (LoRA) is called
            logits = layer(query + query_pos)
        weights = logits.view(batch, num_queries, m, n_lvl * p)
        return weights.softmax(-1).view(batch, num_queries, m, n_lvl, p)


def _linear(x, pos, weight, bias) -> torch.Tensor:
    """``F.linear(x + pos, ...)``, or of ``x`` alone where ``pos`` is None."""
    return F.linear(x, weight, bias) if pos is None else sum_linear(x, pos, weight, bias)


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
    modules = (m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention))
    with switched(modules, "kernel", kernel):
        yield model
