"""
Training-speed changes that must not change numbers: the FFN's ReLU runs in place only without
autograd, and the deformable attention's value table is built without slice assignments, so
that no backward clones a whole gradient (``CopySlices``); outputs and gradients stay equal.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grounding_dino.modeling.ffn import PostNormFFNLayer


def _graph_nodes(tensor):
    """Names of every autograd node behind ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


class _Layer(PostNormFFNLayer):
    def __init__(self):
        super().__init__()
        self._build_ffn(16, 64, 0.0)
        self.norm = nn.LayerNorm(16)


def test_ffn_trains_without_copy_slices_and_equals_the_formula():
    torch.manual_seed(0)
    layer = _Layer().train()
    x = torch.randn(2, 37, 16, requires_grad=True)
    out = layer.ffn(x, layer.norm)
    assert "CopySlices" not in _graph_nodes(out)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()])

    x_ref = x.detach().clone().requires_grad_()
    hidden = F.relu(F.linear(x_ref, layer.linear1.weight, layer.linear1.bias))
    expected = layer.norm(x_ref + F.linear(hidden, layer.linear2.weight, layer.linear2.bias))
    expected_grads = torch.autograd.grad((expected * probe).sum(), [x_ref, *layer.parameters()])
    assert torch.equal(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.equal(grad, expected_grad)
    with torch.no_grad():  # inference (in place) gives the same values
        assert torch.equal(layer.ffn(x, layer.norm), expected)


def test_deformable_attention_trains_without_copy_slices():
    from grounding_dino.modeling.deformable_attention import MultiScaleDeformableAttention

    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(
        embed_dim=32, num_heads=4, num_levels=2, num_points=2
    ).train()
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    value = torch.randn(1, 39, 32, requires_grad=True)
    out = attention(torch.randn(1, 7, 32), torch.rand(1, 7, 2, 2), value, shapes, starts)
    assert "CopySlices" not in _graph_nodes(out)


@pytest.mark.parametrize("native", [True, False])
def test_bilinear_sampling_keeps_only_its_inputs_for_the_backward(monkeypatch, native):
    """The sampling's training graph saves the table, the coordinates and the attention
    weights, not the corner rows, corner weights and their products (recomputed in the
    backward); its gradients, from the compiled CPU kernel or from PyTorch, equal autograd's
    through the written-out formula."""
    from grounding_dino.modeling import native_kernels
    from grounding_dino.modeling.deformable_kernels import padded_value_table, sample_padded_table

    monkeypatch.setenv(native_kernels.ENABLE_VARIABLE, "1" if native else "0")
    assert (native_kernels.bilinear_sampling_backward_kernel(torch.float64) is not None) == native

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 5], [3, 4]])
    starts = torch.tensor([0, 30])
    value = torch.randn(2, 42, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    # Coordinates beyond the maps too (-1.7 .. W + 0.7): the clamp's gradient mask.
    size = shapes.flip(-1).double().view(1, 1, 1, 2, 1, 2)
    points = torch.rand(2, 5, 3, 2, 4, 2, dtype=torch.float64, generator=gen) * 1.3 - 0.15
    points = (points * (size + 1.4) - 1.7).requires_grad_()
    attention = torch.rand(2, 5, 3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    probe = torch.randn(2, 5, 24, dtype=torch.float64, generator=gen)

    table = padded_value_table(value, shapes, starts)
    x, y = points[..., 0], points[..., 1]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sample_padded_table(table, x, y, attention)
    kept = {t.untyped_storage().data_ptr() for t in saved}
    inputs = {t.untyped_storage().data_ptr() for t in (table.table, points, attention)}
    assert kept == inputs, [tuple(t.shape) for t in saved]
    grads = torch.autograd.grad((out * probe).sum(), [value, points, attention])

    # The formula through autograd: bilinear corners of the coordinates clamped to [-1, W].
    expected = torch.zeros(2, 5, 3, 8, dtype=torch.float64)
    for level, ((h, w), start) in enumerate(zip(shapes.tolist(), starts.tolist())):
        grid = value[:, start : start + h * w].view(2, h, w, 3, 8)
        grid = F.pad(grid, (0, 0, 0, 0, 1, 2, 1, 2))  # zero border, as the table's
        cx = points[:, :, :, level, :, 0].clamp(-1, w)
        cy = points[:, :, :, level, :, 1].clamp(-1, h)
        x0, y0 = cx.detach().floor(), cy.detach().floor()
        fx, fy = cx - x0, cy - y0
        heads = torch.arange(3).view(1, 1, 3, 1).expand(2, 5, 3, 4)
        batch = torch.arange(2).view(2, 1, 1, 1).expand(2, 5, 3, 4)
        for dx, dy, weight in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xi, yi = (x0 + dx + 1).long(), (y0 + dy + 1).long()
            corner = grid[batch, yi, xi, heads]  # [2, 5, 3, 4, 8]
            expected = expected + (corner * (weight * attention[:, :, :, level])[..., None]).sum(3)
    expected = expected.view(2, 5, 24)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    expected_grads = torch.autograd.grad((expected * probe).sum(), [value, points, attention])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
        assert grad.abs().sum() > 0
