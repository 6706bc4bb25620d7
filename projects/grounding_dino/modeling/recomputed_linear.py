"""Linear layers whose input is cheap to compute again: the backward recomputes it from what is
kept anyway instead of keeping one more [tokens, C] tensor per layer.

:func:`layer_norm_linear`: ``y = layer_norm(x); linear(y)`` keeps ``x``, not ``y`` too. A
post-norm layer normalises its residual sum and feeds the result to a linear layer (the
enhancer's ``norm1`` -> ``linear1``). Autograd then keeps both the norm's input (for the
norm's backward) and its output (for the linear's weight gradient): two [tokens, C] tensors
per layer, at 800x1333 about 23 MB each per encoder layer. :func:`layer_norm_linear` keeps
the input and the norm's statistics only and normalises again in the backward (one
elementwise pass over [tokens, C], bit for bit the forward's output).

:func:`sum_linear`: ``linear(x + pos)`` keeps ``x`` and ``pos`` (the image tokens and their
position embedding, which the layer keeps or reuses anyway), not their sum: the deformable
attention's offset and weight projections of ``query + query_pos``.

:mod:`.recomputed_ffn` does the same for whole FFNs, hidden layer included.

Each runs the plain modules where :func:`can_recompute` is False and for a linear layer that is
not exactly ``nn.Linear`` (a LoRA adapter: its own weights and dropout, which must be called).
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["can_recompute", "layer_norm_linear", "sum_linear"]


def can_recompute() -> bool:
    """Whether autograd records and no autocast is on: under autocast the saved inputs and the
    weights differ in dtype, and a backward that computes again would not cast them."""
    return (
        torch.is_grad_enabled()
        and not torch.is_autocast_enabled()
        and not torch.is_autocast_cpu_enabled()
    )


class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, shape, eps):
        normed, mean, rstd = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.shape, ctx.eps, ctx.has_bias = shape, eps, bias is not None
        return normed, F.linear(normed, weight, bias)

    @staticmethod
    def backward(ctx, grad_normed, grad_out):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_weight = grad_bias = None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if needs[3]:
            normed = torch.native_layer_norm(x, ctx.shape, norm_weight, norm_bias, ctx.eps)[0]
            grad_weight = rows.t() @ normed.reshape(-1, normed.shape[-1])
        if ctx.has_bias and needs[4]:
            grad_bias = rows.sum(0)
        grad_x = grad_norm_weight = grad_norm_bias = None
        if any(needs[:3]):
            grad_normed = (
                grad_out @ weight if grad_normed is None else grad_normed.add(grad_out @ weight)
            )
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, ctx.shape, mean, rstd, norm_weight, norm_bias, list(needs[:3])
            )
        return grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None


def layer_norm_linear(
    x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``(norm(x), linear(norm(x)))``, saving ``x`` and not ``norm(x)`` for the backward when
    autograd records; the two modules' own calls otherwise, and under autocast (where the
    linear runs in another dtype than the norm).

    Args:
        x: [..., C]; norm: a LayerNorm over C (affine); linear: C -> D.

    Returns:
        [..., C] the normalised ``x`` and [..., D] the linear layer's output.
    """
    plain_modules = type(norm) is nn.LayerNorm and type(linear) is nn.Linear
    if not (can_recompute() and plain_modules and norm.elementwise_affine):
        normed = norm(x)
        return normed, linear(normed)
    shape: Sequence[int] = list(norm.normalized_shape)
    bias: Optional[torch.Tensor] = linear.bias
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, linear.weight, bias, shape, norm.eps)


class _SumLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, weight, bias):
        ctx.save_for_backward(x, pos, weight)
        ctx.has_bias = bias is not None
        return F.linear(x + pos, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, pos, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])
        if needs[0] or needs[1]:
            grad_input = grad @ weight
        if needs[2]:
            summed = x + pos
            grad_weight = rows.t() @ summed.reshape(-1, summed.shape[-1])
        if ctx.has_bias and needs[3]:
            grad_bias = rows.sum(0)
        return (
            _reduced_to(grad_input, x) if needs[0] else None,
            _reduced_to(grad_input, pos) if needs[1] else None,
            grad_weight,
            grad_bias,
        )


def _reduced_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dimensions ``like`` was broadcast along."""
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


def sum_linear(
    x: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """
    ``F.linear(x + pos, weight, bias)``, saving ``x`` and ``pos`` and not their sum for the
    backward when autograd records (the plain call otherwise, and under autocast).

    Args:
        x: [..., C]; pos: broadcastable to ``x``; weight: [D, C]; bias: [D] or None.

    Returns:
        [..., D]
    """
    if not can_recompute():
        return F.linear(x + pos, weight, bias)
    return _SumLinear.apply(x, pos, weight, bias)
