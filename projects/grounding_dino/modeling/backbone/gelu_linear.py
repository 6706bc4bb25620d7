"""``linear(gelu(a))`` that keeps ``a`` for the backward and not ``gelu(a)`` too.

In an MLP ``fc2(gelu(fc1(x)))`` autograd keeps two tensors of the hidden size for the backward:
GELU's input (for its own backward) and its output (for ``fc2``'s weight gradient). The hidden
layer is 4x the channels, so in Swin's first stage these two are the body's largest saved
tensors. :func:`gelu_linear` keeps only GELU's input and computes its output again in the
backward, where it is needed for one matrix product: an elementwise pass, against one hidden
tensor less per block for the whole step.
"""

import torch
import torch.nn.functional as F

__all__ = ["gelu_linear"]


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, approximate):
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias, ctx.approximate = bias is not None, approximate
        return F.linear(F.gelu(hidden, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.ops.aten.gelu_backward(
                grad @ weight, hidden, approximate=ctx.approximate
            )
        if ctx.needs_input_grad[1]:
            activated = F.gelu(hidden, approximate=ctx.approximate)
            grad_weight = rows.t() @ activated.reshape(-1, activated.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_hidden, grad_weight, grad_bias, None


def gelu_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias=None, approximate: str = "none"
) -> torch.Tensor:
    """
    ``F.linear(F.gelu(hidden, approximate=approximate), weight, bias)``, saving only ``hidden``
    (and ``weight``) for the backward.

    Args:
        hidden: [..., H] GELU's input.
        weight: [C, H]; bias: [C] or None.

    Returns:
        [..., C]
    """
    return _GeluLinear.apply(hidden, weight, bias, approximate)
