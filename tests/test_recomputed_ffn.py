"""The chunked FFN of training (``modeling/recomputed_ffn.py``): the plain modules' outputs and
gradients, no hidden-size tensor kept for the backward, and the plain path wherever it does not
apply."""

import pytest
import torch
from torch import nn

from grounding_dino.modeling.recomputed_ffn import ACTIVATIONS, can_chunk, chunked_ffn

CHANNELS, HIDDEN = 24, 96


def _modules(with_norm: bool, activation: str):
    torch.manual_seed(0)
    norm = nn.LayerNorm(CHANNELS) if with_norm else None
    if norm is not None:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    approximate = ACTIVATIONS[activation]
    act = nn.ReLU() if approximate is None else nn.GELU(approximate=approximate)
    return norm, nn.Linear(CHANNELS, HIDDEN), act, nn.Linear(HIDDEN, CHANNELS)


def _run(fn, x, parameters):
    """fn(x) -> outputs, the gradients of a loss on them, and the shapes autograd kept."""
    inputs = x.detach().clone().requires_grad_(x.requires_grad)
    for parameter in parameters:
        parameter.grad = None
    saved = []

    def keep(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        outputs = fn(inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    # The normalised input also goes on (the enhancer's residual), so its gradient adds up.
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs)
    loss.backward()
    grads = [inputs.grad] + [p.grad for p in parameters]
    return outputs, grads, saved


def _assert_close_to_rounding(got, expected):
    """Sums over differently chunked rows differ in the last bits: relative to the tensor's
    largest element."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


def _hidden_layers(shapes):
    """The [..., HIDDEN] activations among saved shapes (not the weights and biases)."""
    return [s for s in shapes if s[-1] == HIDDEN and s not in ((HIDDEN,), (CHANNELS, HIDDEN))]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("with_norm", [True, False])
def test_chunked_ffn_equals_the_plain_modules_and_keeps_no_hidden_layer(with_norm, activation):
    norm, linear1, act, linear2 = _modules(with_norm, activation)
    parameters = [*linear1.parameters(), *linear2.parameters()]
    parameters += [] if norm is None else list(norm.parameters())
    x = torch.randn(2, 50, CHANNELS, requires_grad=True)

    def plain(inputs):
        normed = inputs if norm is None else norm(inputs)
        out = linear2(act(linear1(normed)))
        return out if norm is None else (normed, out)

    # 100 rows in chunks of 16: six full chunks and a partial one.
    reference = _run(plain, x, parameters)
    ours = _run(
        lambda inputs: chunked_ffn(inputs, norm, linear1, linear2, activation, 16), x, parameters
    )
    for expected, got in zip(reference[0], ours[0]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert all(g is not None for g in ours[1])
    for expected, got in zip(reference[1], ours[1]):
        _assert_close_to_rounding(got, expected)
    assert _hidden_layers(reference[2]) and not _hidden_layers(ours[2])
    if norm is not None:  # and not the normalised input either: only x itself is [.., C]
        assert sum(shape == tuple(x.shape) for shape in ours[2]) == 1


def test_chunked_ffn_with_frozen_layers_gives_the_trainable_gradients():
    """A frozen ``linear1`` and norm and an input without gradient (a fine-tune that trains the
    FFN's last layer only): only ``linear2`` gets gradients, equal to the plain ones."""
    norm, linear1, act, linear2 = _modules(True, "relu")
    for parameter in [*norm.parameters(), *linear1.parameters()]:
        parameter.requires_grad_(False)
    x = torch.randn(3, 20, CHANNELS)

    def plain(inputs):
        return linear2(act(linear1(norm(inputs))))

    reference = _run(plain, x, list(linear2.parameters()))
    ours = _run(
        lambda i: chunked_ffn(i, norm, linear1, linear2, "relu", 7)[1], x, [*linear2.parameters()]
    )
    assert ours[1][0] is None and all(p.grad is None for p in linear1.parameters())
    for expected, got in zip(reference[1][1:], ours[1][1:]):
        _assert_close_to_rounding(got, expected)


def test_can_chunk_only_where_the_plain_modules_would_compute_the_same():
    norm, linear1, _, linear2 = _modules(True, "relu")
    idle, active = nn.Dropout(0.0), nn.Dropout(0.1)
    assert can_chunk(norm, linear1, linear2, idle) and can_chunk(None, linear1, linear2)
    assert not can_chunk(norm, linear1, linear2, active)
    assert can_chunk(norm, linear1, linear2, active.eval())

    class Adapted(nn.Linear):  # a LoRA-like layer: its forward must be called
        pass

    assert not can_chunk(norm, Adapted(CHANNELS, HIDDEN), linear2)
    assert not can_chunk(nn.LayerNorm(CHANNELS, elementwise_affine=False), linear1, linear2)
    with torch.no_grad():
        assert not can_chunk(norm, linear1, linear2)
    with torch.autocast("cpu", torch.bfloat16):
        assert not can_chunk(norm, linear1, linear2)


def test_unknown_activation_is_named():
    _, linear1, _, linear2 = _modules(False, "relu")
    with pytest.raises(ValueError, match="'swish'"):
        chunked_ffn(torch.randn(4, CHANNELS), None, linear1, linear2, "swish", 2)


def test_chunked_ffn_costs_one_more_product_of_linear1():
    """Counted by torch's FLOP counter (which also checks that the function runs under a
    dispatch mode): the plain FFN's 6 products of [rows, C] x [C, F] per step, plus the
    backward's recomputation of ``linear1``."""
    from torch.utils.flop_counter import FlopCounterMode

    norm, linear1, act, linear2 = _modules(True, "relu")
    x = torch.randn(2, 50, CHANNELS, requires_grad=True)
    flops = []
    for fn in (
        lambda i: linear2(act(linear1(norm(i)))),
        lambda i: chunked_ffn(i, norm, linear1, linear2, "relu", 16)[1],
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            fn(x).sum().backward()
        flops.append(counter.get_total_flops())
    product = 2 * 100 * CHANNELS * HIDDEN
    assert flops == [6 * product, 7 * product]
