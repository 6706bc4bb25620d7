"""
Training-speed changes that must not change numbers: the FFN's ReLU runs in place only without
autograd, and the deformable attention's value table is built without slice assignments, so
that no backward clones a whole gradient (``CopySlices``); outputs and gradients stay equal.
"""

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
