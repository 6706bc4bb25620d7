"""The gradients of a block-structured weighted gather, in PyTorch: the backward of the
deformable attention's sampling (:mod:`.bilinear_sampling`) where its compiled CPU kernel is not
used (other devices and dtypes, no C compiler, kernels turned off).

The gather is ``out[n] = sum_k weights[n, k] * table[rows[n, k]]``, the forward's
:func:`torch.nn.functional.embedding_bag`. Autograd's backward of ``embedding_bag`` sorts all
``N * K`` row indices on the CPU to sum the table's gradient, and computes the weights'
gradient row by row. Here every bag ``n = (b, q, m)`` (image, query, head) reads only rows of
its own image and head (``rows = (b * T + t) * M + m`` for a pixel ``t`` of the image's padded
table of ``T`` pixels), so both gradients are batched matrix products per (image, head):

- ``S[b, m]`` [Q, T] scatters the bag weights onto pixels (a dense scatter-add);
- ``grad_table[b, m] = S[b, m]^T @ grad[b, m]`` [T, D];
- ``grad_weights[b, q, m, k] = (grad[b, m] @ table[b, m]^T)[q, t(b, q, m, k)]``, a gather.

When the dense ``[B, M, Q, T]`` matrices would be large (big images in training), the gradients
go image by image (:func:`_blockwise_backward`) and never hold more than one image's indices
or a bounded chunk of gathered rows: an image's table gradient is the transposed gather, one
``embedding_bag`` over its corners sorted by row, and the weights' gradient a row gather of
``WEIGHTS_GRADIENT_CHUNK`` elements at a time. (The sparse-dense product and the row gather of
all ``N * K`` rows at once that it replaces held about 1.8 GB at 800x1333 per image and encoder
layer: a ``[N * K, D]`` gather and ``[2, N * K]`` int64 indices.) Both paths give the autograd
gradients of ``embedding_bag`` (up to float summation order).
"""

import torch
import torch.nn.functional as F

__all__ = ["weighted_gather_gradients"]

# Above this many elements of a [B, M, Q, T] matrix (64 MiB in float32) the backward goes image
# by image (_blockwise_backward), whose memory grows with one image's N * K instead of Q * T.
DENSE_BACKWARD_LIMIT = 1 << 24
# Elements of the gathered table rows that one step of the weights' gradient holds (32 MiB in
# float32): 4096 queries of 64 corners of 32 channels.
WEIGHTS_GRADIENT_CHUNK = 1 << 23


def weighted_gather_gradients(
    table: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    grad: torch.Tensor,
    batch: int,
    heads: int,
    need_table: bool = True,
    need_weights: bool = True,
):
    """
    The gradients of ``out[n] = sum_k weights[n, k] * table[rows[n, k]]`` (the module
    docstring says how).

    Args:
        table: [B * T * M, D] rows ``(b * T + t) * M + m`` (image b, pixel t, head m).
        rows: [N, K] int32/int64 rows, N = B * Q * M bags in (b, q, m) order, each reading only
            rows of its own image b and head m.
        weights: [N, K] per-row weights.
        grad: [N, D] the gradient of ``out``.
        batch, heads: B and M.
        need_table, need_weights: which gradients to compute.

    Returns:
        (grad_table [B * T * M, D] or None, grad_weights [N, K] or None).
    """
    num_bags, num_corners = rows.shape
    dim = table.shape[1]
    queries = num_bags // (batch * heads)
    pixels = table.shape[0] // (batch * heads)
    grad = grad.contiguous()
    if batch * heads * queries * pixels > DENSE_BACKWARD_LIMIT:
        return _blockwise_backward(
            table, rows, weights, grad, batch, heads, need_table, need_weights
        )
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
    return grad_table, grad_weights


def _blockwise_backward(table, rows, weights, grad, batch, heads, need_table, need_weights):
    """The gradients of ``embedding_bag`` image by image, in bounded memory.

    Args:
        table: [B * T * M, D]; rows, weights: [N, K], N = B * Q * M; grad: [N, D] contiguous.
        batch, heads: B and M.
        need_table, need_weights: which gradients to compute.

    Returns:
        (``grad_table`` [B * T * M, D] or None, ``grad_weights`` [N, K] or None).
    """
    num_bags, num_corners = rows.shape
    dim = table.shape[1]
    table_rows = table.shape[0] // batch  # T * M rows per image
    bags = num_bags // batch  # Q * M bags per image
    grad_table = table.new_empty(table.shape) if need_table else None
    grad_weights = weights.new_empty(weights.shape) if need_weights else None
    if need_table:
        # grad_table[r] = sum over the corners (n, k) that read row r of w[n, k] * grad[n]: the
        # corners sorted by row form one bag per table row (rows nobody reads get zeros). One
        # sort per image: a large sort is much faster per element than many small ones.
        for b in range(batch):
            # Out of place: int64 rows would otherwise be the saved indices themselves.
            flat = rows[b * bags : (b + 1) * bags].reshape(-1).long() - b * table_rows
            order = torch.argsort(flat)
            offsets = torch.zeros(table_rows, dtype=torch.long, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=table_rows)[:-1], 0, out=offsets[1:])
            del flat
            image_weights = weights[b * bags : (b + 1) * bags].reshape(-1)[order]
            grad_table[b * table_rows : (b + 1) * table_rows] = F.embedding_bag(
                order.div_(num_corners, rounding_mode="floor").add_(b * bags),
                grad,
                offsets,
                mode="sum",
                per_sample_weights=image_weights.to(grad.dtype),
            )
            del order, image_weights
    if need_weights:
        # grad_weights[n, k] = table[rows[n, k]] . grad[n], a bounded chunk of bags at a time.
        chunk = max(1, WEIGHTS_GRADIENT_CHUNK // (num_corners * dim))
        for start in range(0, num_bags, chunk):
            end = min(start + chunk, num_bags)
            gathered = table.index_select(0, rows[start:end].reshape(-1))
            gathered = gathered.view(end - start, num_corners, dim)
            # Assigned, not written with ``out=``: torch 2.3's FLOP counter fails on ``out=``
            # (the benchmark counts a step's GFLOP); a chunk's product is a few MB.
            grad_weights[start:end] = torch.bmm(gathered, grad[start:end, :, None])[..., 0]
    return grad_table, grad_weights
