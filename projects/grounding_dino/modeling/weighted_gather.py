"""The weighted gather of the deformable attention's ``embedding_bag`` kernel, with a backward
that uses its block structure.

Forward, ``out[n] = sum_k weights[n, k] * table[rows[n, k]]`` is one
:func:`torch.nn.functional.embedding_bag`, which is fast. Its autograd backward is not: on the
CPU it sorts all ``N * K`` row indices to sum the table's gradient, and computes the weights'
gradient row by row, so that it, not the forward, dominates the deformable attention's
training time.

Here every bag ``n = (b, q, m)`` (image, query, head) reads only rows of its own image and head
(``rows = (b * T + t) * M + m`` for a pixel ``t`` of the image's padded table of ``T`` pixels),
so both gradients are batched matrix products per (image, head):

- ``S[b, m]`` [Q, T] scatters the bag weights onto pixels (a dense scatter-add);
- ``grad_table[b, m] = S[b, m]^T @ grad[b, m]`` [T, D];
- ``grad_weights[b, q, m, k] = (grad[b, m] @ table[b, m]^T)[q, t(b, q, m, k)]``, a gather.

When the dense ``[B, M, Q, T]`` matrices would be large (big images in training), the table's
gradient is a sparse-dense product instead and the weights' gradient a row gather. All paths give
the autograd gradients of ``embedding_bag`` (up to float summation order).
"""

import torch
import torch.nn.functional as F

__all__ = ["weighted_gather"]

# Above this many elements of a [B, M, Q, T] matrix (64 MiB in float32) the backward uses the
# sparse path, whose memory grows with N * K instead of Q * T.
DENSE_BACKWARD_LIMIT = 1 << 24


class _BlockWeightedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, rows, weights, batch: int, heads: int):
        ctx.save_for_backward(table, rows, weights)
        ctx.batch, ctx.heads = batch, heads
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad):
        table, rows, weights = ctx.saved_tensors
        batch, heads = ctx.batch, ctx.heads
        num_bags, num_corners = rows.shape
        dim = table.shape[1]
        queries = num_bags // (batch * heads)
        pixels = table.shape[0] // (batch * heads)
        need_table, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad = grad.contiguous()
        if batch * heads * queries * pixels <= DENSE_BACKWARD_LIMIT:
            # Pixel of each corner within its (image, head) block: [B, M, Q, K].
            base = torch.arange(batch, device=rows.device, dtype=rows.dtype).view(-1, 1, 1, 1)
            head = torch.arange(heads, device=rows.device, dtype=rows.dtype).view(1, 1, -1, 1)
            local = rows.view(batch, queries, heads, num_corners) - base * (pixels * heads) - head
            local = torch.div(local, heads, rounding_mode="floor").transpose(1, 2).long()
            grad_blocks = grad.view(batch, queries, heads, dim).transpose(1, 2)  # [B, M, Q, D]
            grad_table = grad_weights = None
            if need_table:
                scatter = grad.new_zeros(batch, heads, queries, pixels)
                block_weights = weights.view(batch, queries, heads, num_corners).transpose(1, 2)
                scatter.scatter_add_(3, local, block_weights.to(grad.dtype))
                grad_table = torch.matmul(scatter.transpose(2, 3), grad_blocks)  # [B, M, T, D]
                grad_table = grad_table.transpose(1, 2).reshape(table.shape)
            if need_weights:
                table_blocks = table.view(batch, pixels, heads, dim).permute(0, 2, 3, 1)
                scores = torch.matmul(grad_blocks, table_blocks)  # [B, M, Q, T]
                grad_weights = scores.gather(3, local).transpose(1, 2).reshape(weights.shape)
            return grad_table, None, grad_weights, None, None

        flat = rows.reshape(-1).long()
        grad_table = grad_weights = None
        if need_table:
            bag = torch.arange(num_bags, device=rows.device).repeat_interleave(num_corners)
            scatter = torch.sparse_coo_tensor(
                torch.stack([flat, bag]), weights.reshape(-1).to(grad.dtype), (len(table), num_bags)
            )
            grad_table = torch.sparse.mm(scatter, grad)
        if need_weights:
            gathered = table.index_select(0, flat).view(num_bags, num_corners, dim)
            grad_weights = torch.bmm(gathered, grad.unsqueeze(-1)).view(weights.shape)
        return grad_table, None, grad_weights, None, None


def weighted_gather(
    table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, batch: int, heads: int
) -> torch.Tensor:
    """
    ``out[n] = sum_k weights[n, k] * table[rows[n, k]]``.

    Args:
        table: [B * T * M, D] rows ``(b * T + t) * M + m`` (image b, pixel t, head m).
        rows: [N, K] int32/int64 rows, N = B * Q * M bags in (b, q, m) order, each reading only
            rows of its own image b and head m.
        weights: [N, K] per-row weights.
        batch, heads: B and M.

    Returns:
        [N, D]. Gradients flow to ``table`` and ``weights`` (see the module docstring); without
        gradients this is ``embedding_bag`` itself.
    """
    if not (table.requires_grad or weights.requires_grad) or not torch.is_grad_enabled():
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)
    return _BlockWeightedGather.apply(table, rows, weights, batch, heads)
