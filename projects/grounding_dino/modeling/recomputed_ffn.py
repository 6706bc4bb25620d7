"""Feed-forward layers in training without keeping their hidden layer.

An FFN ``linear2(act(linear1(y)))`` keeps its [tokens, ffn_dim] hidden layer for ``linear2``'s
weight gradient and the activation's backward: 4x (Swin's MLP) or 8x (the enhancer's FFN) the
channels of a token, the largest tensors a training step keeps (at 800x1333 about 180 MB per
encoder layer, a quarter of everything the step saves; in Swin's first stage about 100 MB
per block).
:func:`chunked_ffn` keeps the FFN's input only, and its backward computes the hidden layer
again, which costs one more product of ``linear1`` (a sixth of the FFN's matrix work).

With a norm before the FFN (the enhancer's post-norm ``y = norm1(s)``), it keeps ``s`` and the
norm's statistics and not ``y`` either, as :func:`.recomputed_linear.layer_norm_linear` does.

Forward and backward run in chunks of rows, so that no [tokens, ffn_dim] tensor is allocated:
a chunk's hidden layer is a few MB that the allocator hands out again for the next chunk,
instead of a fresh [tokens, ffn_dim] block per layer (at the official sizes above glibc's
largest mmap threshold: fresh pages faulted in at every step). That pays for most of the
product computed again (docs/benchmarks.md: a step 3% dearer at 480x800). The outputs and the
input's gradient are those of the plain modules; the weight gradients are sums over the
chunks, equal to the plain ones up to float rounding.
"""

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .recomputed_linear import can_recompute

__all__ = ["ACTIVATIONS", "can_chunk", "chunked_ffn"]

# activation name -> GELU's ``approximate`` (None: ReLU)
ACTIVATIONS = {"relu": None, "gelu": "none", "gelu_tanh": "tanh"}


class _Spec(NamedTuple):
    norm_shape: Optional[Sequence[int]]  # None: no norm before the FFN
    eps: float
    activation: str
    chunk: int


def _pre_activation(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """rows @ weight.T + bias: [n, C_in] -> [n, C_out]."""
    return rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())


def _activated(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation of ``pre``; ReLU in place (its backward needs only the output)."""
    approximate = ACTIVATIONS[activation]
    return pre.relu_() if approximate is None else F.gelu(pre, approximate=approximate)


def _activation_backward_(grad: torch.Tensor, pre, hidden, activation: str) -> None:
    """``grad`` w.r.t. the activation's output -> w.r.t. its input, in place; the kernels that
    autograd runs for ``relu`` (on the output) and ``gelu`` (on the input)."""
    approximate = ACTIVATIONS[activation]
    if approximate is None:
        torch.ops.aten.threshold_backward.grad_input(grad, hidden, 0, grad_input=grad)
    else:
        torch.ops.aten.gelu_backward.grad_input(grad, pre, approximate=approximate, grad_input=grad)


def _normalised(x, norm_weight, norm_bias, spec: _Spec):
    """(y, mean, rstd): ``x`` layer-normed as the module does, or ``(x, None, None)`` without a
    norm; the same kernel in forward and backward, so the recomputed ``y`` is bit for bit the
    forward's."""
    if spec.norm_shape is None:
        return x, None, None
    return torch.native_layer_norm(x, spec.norm_shape, norm_weight, norm_bias, spec.eps)


class _ChunkSums:
    """Weight gradients summed over the chunks of rows."""

    def __init__(self):
        self._sums = {}

    def add_product(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        # Not ``addmm_``: torch 2.3's FLOP counter does not count in-place products.
        self._sums[name] = torch.addmm(self._sums[name], a, b) if name in self._sums else a @ b

    def add_row_sum(self, name: str, rows: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] += rows.sum(0)
        else:
            self._sums[name] = rows.sum(0)

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self._sums.get(name)


class _ChunkedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight1, bias1, weight2, bias2, spec: _Spec):
        normed, mean, rstd = _normalised(x, norm_weight, norm_bias, spec)
        rows = normed.reshape(-1, normed.shape[-1])
        out = rows.new_empty(rows.shape[0], weight2.shape[0])
        for start in range(0, rows.shape[0], spec.chunk):
            part = slice(start, start + spec.chunk)
            hidden = _activated(_pre_activation(rows[part], weight1, bias1), spec.activation)
            # Assigned, not written with ``out=``: torch 2.3's FLOP counter fails on ``out=``.
            out[part] = _pre_activation(hidden, weight2, bias2)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight1, bias1, weight2)
        ctx.spec, ctx.has_bias2 = spec, bias2 is not None
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if spec.norm_shape is None else (normed, out)

    @staticmethod
    def backward(ctx, *grads):
        x, mean, rstd, norm_weight, norm_bias, weight1, bias1, weight2 = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        grad_normed, grad_out = (None, grads[0]) if spec.norm_shape is None else grads
        normed = _normalised(x, norm_weight, norm_bias, spec)[0].reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        sums = _ChunkSums()
        grad_input = normed.new_empty(normed.shape) if any(needs[:3]) else None
        for start in range(0, normed.shape[0], spec.chunk):
            part = slice(start, start + spec.chunk)
            pre = _pre_activation(normed[part], weight1, bias1)
            hidden = _activated(pre, spec.activation)
            if needs[5]:
                sums.add_product("weight2", grad_rows[part].t(), hidden)
            grad_hidden = grad_rows[part] @ weight2
            _activation_backward_(grad_hidden, pre, hidden, spec.activation)
            if needs[3]:
                sums.add_product("weight1", grad_hidden.t(), normed[part])
            if bias1 is not None and needs[4]:
                sums.add_row_sum("bias1", grad_hidden)
            if grad_input is not None:
                grad_input[part] = grad_hidden @ weight1
        grad_x = grad_norm_weight = grad_norm_bias = None
        if grad_input is not None:
            grad_x = grad_input.view(x.shape)
            if grad_normed is not None:
                grad_x += grad_normed
            if spec.norm_shape is not None:
                grad_x, grad_norm_weight, grad_norm_bias = (
                    torch.ops.aten.native_layer_norm_backward(
                        grad_x,
                        x,
                        spec.norm_shape,
                        mean,
                        rstd,
                        norm_weight,
                        norm_bias,
                        list(needs[:3]),
                    )
                )
        grad_bias2 = grad_rows.sum(0) if ctx.has_bias2 and needs[6] else None
        return (
            grad_x,
            grad_norm_weight,
            grad_norm_bias,
            sums.get("weight1"),
            sums.get("bias1"),
            sums.get("weight2"),
            grad_bias2,
            None,
        )


def chunked_ffn(
    x: torch.Tensor,
    norm: Optional[nn.LayerNorm],
    linear1: nn.Linear,
    linear2: nn.Linear,
    activation: str,
    chunk: int,
):
    """
    ``linear2(act(linear1(y)))`` with ``y = norm(x)`` (``y = x`` without a norm), keeping only
    ``x`` (and the norm's statistics) for the backward (see the module docstring). To be called
    where autograd records, no autocast is on (:func:`.recomputed_linear.can_recompute`), the
    FFN's dropouts are inactive and the modules are exactly ``nn.LayerNorm``/``nn.Linear`` (a
    LoRA adapter's own weights must be called): see :func:`can_chunk`.

    Args:
        x: [..., C]; norm: an affine LayerNorm over C, or None; linear1: C -> F;
        linear2: F -> C_out; activation: a key of :data:`ACTIVATIONS`; chunk: rows per chunk
        on the CPU (other devices: one chunk).

    Returns:
        [..., C_out] the FFN's output; with a norm, ``(norm(x), output)``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown FFN activation {activation!r}; known: {list(ACTIVATIONS)}")
    if x.device.type != "cpu":
        # A caching allocator (CUDA's) hands out blocks again without page faults, and small
        # products would leave a GPU idle: all rows at once, the hidden layer still not kept.
        chunk = max(1, x.numel() // max(1, x.shape[-1]))
    if norm is None:
        spec, norm_weight, norm_bias = _Spec(None, 0.0, activation, chunk), None, None
    else:
        spec = _Spec(list(norm.normalized_shape), norm.eps, activation, chunk)
        norm_weight, norm_bias = norm.weight, norm.bias
    return _ChunkedFFN.apply(
        x.contiguous(),
        norm_weight,
        norm_bias,
        linear1.weight,
        linear1.bias,
        linear2.weight,
        linear2.bias,
        spec,
    )


def can_chunk(norm: Optional[nn.Module], linear1: nn.Module, linear2: nn.Module, *dropouts) -> bool:
    """Whether :func:`chunked_ffn` applies here and now: autograd records without autocast, the
    modules are the plain ones (``norm`` an affine ``nn.LayerNorm`` or None) and no dropout
    is active."""
    plain_norm = norm is None or (type(norm) is nn.LayerNorm and norm.elementwise_affine)
    plain_linears = type(linear1) is nn.Linear and type(linear2) is nn.Linear
    inactive = all(not (dropout.training and dropout.p > 0) for dropout in dropouts)
    return can_recompute() and plain_norm and plain_linears and inactive
