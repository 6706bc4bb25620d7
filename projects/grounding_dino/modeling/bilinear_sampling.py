"""Weighted bilinear sampling of a zero-bordered value table (``deformable_kernels``'s
:class:`~.deformable_kernels.PaddedValueTable`), with a training backward that keeps only its
inputs.

Through autograd, the sampling's corner rows, corner weights and their intermediate products
(about ten [B, Q, M, L, P] tensors and two [B, Q, M, L * P * 4] ones per layer) were kept for
the backward: about 50 MB per enhancer layer at 480x800, 140 MB at 800x1333. The function here
saves the table, the coordinates and the attention weights, and recomputes the rest in the
backward (elementwise, cheap next to the gradients themselves, which come from
:func:`.weighted_gather.weighted_gather_gradients`).
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .native_kernels import bilinear_sampling_backward_kernel
from .weighted_gather import weighted_gather_gradients

__all__ = ["corner_rows_and_fractions", "corner_weights", "sample_corners"]


def corner_rows_and_fractions(padded, x: torch.Tensor, y: torch.Tensor):
    """
    The four bilinear corners of each sampling point.

    Args:
        padded: a ``PaddedValueTable`` (table [B, total, M * D], level shapes, padded starts,
            heads).
        x, y: [B, Q, M, L, P] pixel coordinates (not modified).

    Returns:
        rows: [B, Q, M, L, P, 4] rows of ``table.view(-1, D)`` of the corners (top-left,
            top-right, bottom-left, bottom-right);
        fx, fy: [B, Q, M, L, P] the positions within their cell of the coordinates clamped to
            [-1, W_l] and [-1, H_l] (beyond, every corner is outside and reads zeros).
    """
    table, shapes, padded_starts, num_heads = padded
    batch, total = table.shape[:2]
    device, dtype = table.device, x.dtype
    size = torch.tensor(shapes, dtype=dtype, device=device)
    minus_one = size.new_tensor(-1.0)
    x = torch.clamp(x, min=minus_one, max=size[:, 1:2])  # [L, 1] broadcasts per level
    y = torch.clamp(y, min=minus_one, max=size[:, 0:1])
    x0 = x.floor()
    y0 = y.floor()
    fx = x.sub_(x0)
    fy = y.sub_(y0)

    # Row of the top-left corner within one image:
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
    rows = top_left.to(index_dtype).unsqueeze(-1) + corners
    return rows, fx, fy


def corner_weights(fx: torch.Tensor, fy: torch.Tensor, attention_weights: torch.Tensor):
    """[B, Q, M, L, P, 4] the attention weight times each corner's bilinear weight (no
    autograd: written in place)."""
    fy_a = fy * attention_weights
    wy0 = attention_weights - fy_a
    wx0 = 1 - fx
    weights = wy0.new_empty(wy0.shape + (4,))
    torch.mul(wy0, wx0, out=weights[..., 0])
    torch.mul(wy0, fx, out=weights[..., 1])
    torch.mul(fy_a, wx0, out=weights[..., 2])
    torch.mul(fy_a, fx, out=weights[..., 3])
    return weights


def _gather(padded, rows, weights):
    """``sum_corners weight * table[row]``: [B, Q, M * D]."""
    table, _, _, num_heads = padded
    batch, num_queries = rows.shape[:2]
    bags = batch * num_queries * num_heads
    out = F.embedding_bag(
        rows.view(bags, -1),
        table.view(-1, table.shape[2] // num_heads),
        mode="sum",
        per_sample_weights=weights.view(bags, -1).to(table.dtype),
    )
    return out.view(batch, num_queries, table.shape[2])


class _BilinearGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, x, y, attention_weights, shapes, padded_starts, num_heads, rebuild):
        padded = (table, shapes, padded_starts, num_heads)
        rows, fx, fy = corner_rows_and_fractions(padded, x, y)
        out = _gather(padded, rows, corner_weights(fx, fy, attention_weights))
        ctx.rebuild = None if rebuild is None else rebuild[0]
        sources = (table,) if rebuild is None else tuple(rebuild[1])
        ctx.save_for_backward(x, y, attention_weights, *sources)
        ctx.layout = (shapes, padded_starts, num_heads)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, attention, *sources = ctx.saved_tensors
        if ctx.rebuild is None:
            (table,) = sources
        else:
            with torch.no_grad():
                table = ctx.rebuild(*sources)
        shapes, padded_starts, num_heads = ctx.layout
        need_table, need_x, need_y, need_attention = ctx.needs_input_grad[:4]
        kernel = _native_kernel(table, x, y, attention, grad)
        if kernel is not None:
            saved = (table, x, y, attention)  # ctx.saved_tensors unpacks once (checkpointing)
            gradients = _native_backward(kernel, saved, ctx.layout, ctx.needs_input_grad[:4], grad)
            return gradients + (None, None, None, None)
        rows, fx, fy = corner_rows_and_fractions((table, shapes, padded_starts, num_heads), x, y)
        weights = corner_weights(fx, fy, attention)
        batch, num_queries = x.shape[:2]
        head_dim = table.shape[2] // num_heads
        bags = batch * num_queries * num_heads
        grad_table, grad_weights = weighted_gather_gradients(
            table.view(-1, head_dim),
            rows.view(bags, -1),
            weights.view(bags, -1).to(table.dtype),
            grad.reshape(bags, head_dim),
            batch,
            num_heads,
            need_table,
            need_x or need_y or need_attention,
        )
        if grad_table is not None:
            grad_table = grad_table.view(table.shape)
        grad_x = grad_y = grad_attention = None
        if grad_weights is not None:
            g0, g1, g2, g3 = grad_weights.view(weights.shape).to(fx.dtype).unbind(-1)
            wx0 = 1 - fx
            top = wx0 * g0 + fx * g1  # the loss's derivative by the top row's weight
            bottom = wx0 * g2 + fx * g3
            if need_attention:
                grad_attention = torch.lerp(top, bottom, fy).to(attention.dtype)
            if need_y:
                grad_y = _inside(y, shapes, 0) * attention * (bottom - top)
                grad_y = grad_y.to(y.dtype)
            if need_x:
                fy_a = fy * attention
                grad_x = (attention - fy_a) * (g1 - g0) + fy_a * (g3 - g2)
                grad_x = (grad_x * _inside(x, shapes, 1)).to(x.dtype)
        return grad_table, grad_x, grad_y, grad_attention, None, None, None, None


def _native_kernel(table, x, y, attention, grad):
    """The compiled CPU backward for these tensors, or None (other devices, mixed dtypes,
    kernels turned off or not built)."""
    if table.device.type != "cpu" or not (
        table.dtype == x.dtype == y.dtype == attention.dtype == grad.dtype
    ):
        return None
    return bilinear_sampling_backward_kernel(table.dtype)


def _native_backward(kernel, saved, layout, need, grad):
    """All four gradients in one pass over the sampling points
    (``native/deformable_sampling_backward.c``), on torch's intra-op thread count.

    Args:
        kernel: from :func:`_native_kernel`.
        saved: (table, x, y, attention) as :class:`_BilinearGather` saved them.
        layout: (shapes, padded_starts, num_heads) of the table.
        need: four bools, which gradients to compute.
        grad: [B, Q, M * D] the gradient of the output.

    Returns:
        (grad_table, grad_x, grad_y, grad_attention), None where not needed.
    """
    table, x, y, attention = (t.contiguous() for t in saved)
    shapes, padded_starts, num_heads = layout
    grad = grad.contiguous()
    batch, num_queries, _, num_levels, num_points = x.shape
    levels = torch.tensor(
        [[h for h, _ in shapes], [w for _, w in shapes], list(padded_starts)], dtype=torch.int64
    )
    outputs = [
        (torch.zeros_like if i == 0 else torch.empty_like)(t) if need[i] else None
        for i, t in enumerate((table, x, y, attention))
    ]
    kernel(
        table.data_ptr(),
        x.data_ptr(),
        y.data_ptr(),
        attention.data_ptr(),
        grad.data_ptr(),
        levels[0].data_ptr(),
        levels[1].data_ptr(),
        levels[2].data_ptr(),
        batch,
        num_queries,
        num_heads,
        num_levels,
        num_points,
        table.shape[2] // num_heads,
        table.shape[1] * num_heads,
        *(t.data_ptr() if t is not None else None for t in outputs),
        torch.get_num_threads(),
    )
    return tuple(outputs)


def _inside(coordinate: torch.Tensor, shapes: Sequence[Tuple[int, int]], axis: int):
    """Where the clamp to [-1, size] passes the gradient (ends included, as torch.clamp):
    [B, Q, M, L, P] of the coordinate's dtype."""
    size = torch.tensor([s[axis] for s in shapes], dtype=coordinate.dtype)
    size = size.to(coordinate.device).view(-1, 1)
    return ((coordinate >= -1) & (coordinate <= size)).to(coordinate.dtype)


def sample_corners(
    padded, x: torch.Tensor, y: torch.Tensor, attention_weights: torch.Tensor, rebuild=None
):
    """
    Weighted bilinear sampling of ``padded`` at pixel coordinates (the body of
    :func:`.deformable_kernels.sample_padded_table`).

    Args:
        padded: a ``PaddedValueTable``.
        x, y: [B, Q, M, L, P] pixel coordinates (not modified).
        attention_weights: [B, Q, M, L, P].
        rebuild: optional ``(function, tensors)``: ``function(*tensors)`` gives the table's
            values again, bit for bit. The backward then keeps ``tensors`` (which the graph
            keeps anyway, e.g. the input of the value projection) instead of the table and
            calls ``function`` for it (one projection more per layer, one table less).

    Returns:
        [B, Q, M * D]; differentiable in the table, the coordinates and the weights, with a
        backward that keeps only them (see the module docstring).
    """
    table, shapes, padded_starts, num_heads = padded
    if torch.is_grad_enabled() and any(t.requires_grad for t in (table, x, y, attention_weights)):
        return _BilinearGather.apply(
            table, x, y, attention_weights, list(shapes), list(padded_starts), num_heads, rebuild
        )
    rows, fx, fy = corner_rows_and_fractions(padded, x, y)
    return _gather(padded, rows, corner_weights(fx, fy, attention_weights))
