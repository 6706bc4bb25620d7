"""The deformable attention's weighted gather: its block-structured backward equals autograd's
``embedding_bag`` backward, on each of its paths (the compiled CPU kernel, dense per-block
products and image by image)."""

import pytest
import torch
import torch.nn.functional as F

from grounding_dino.modeling import weighted_gather as module
from grounding_dino.modeling.weighted_gather import weighted_gather

BATCH, HEADS, QUERIES, PIXELS, CORNERS, DIM = 3, 4, 7, 13, 10, 5


def make_inputs(seed=0, dtype=torch.float64, sizes=(BATCH, HEADS, QUERIES, PIXELS, CORNERS, DIM)):
    """(table, int32 rows, weights, probe) of a weighted gather with ``sizes`` (batch, heads,
    queries, pixels, corners, dim): each bag reads rows of its own image and head."""
    batch, heads, queries, pixels, corners, dim = sizes
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(batch * pixels * heads, dim, dtype=dtype, generator=gen)
    pixel = torch.randint(0, pixels, (batch, queries, heads, corners), generator=gen)
    image = torch.arange(batch).view(-1, 1, 1, 1)
    head = torch.arange(heads).view(1, 1, -1, 1)
    rows = ((image * pixels + pixel) * heads + head).view(-1, corners).to(torch.int32)
    weights = torch.rand(rows.shape, dtype=dtype, generator=gen)
    probe = torch.randn(batch * queries * heads, dim, dtype=dtype, generator=gen)
    return table, rows, weights, probe


def _gradients(function, table, rows, weights, probe, which=(True, True)):
    table = table.clone().requires_grad_(which[0])
    weights = weights.clone().requires_grad_(which[1])
    out = function(table, rows, weights)
    wanted = [t for t in (table, weights) if t.requires_grad]
    return (out,) + torch.autograd.grad((out * probe).sum(), wanted)


def _reference(table, rows, weights):
    """The sum written out (autograd's embedding_bag backward fails without table gradients)."""
    return (table[rows.long()] * weights.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("path", ["native", "dense", "image_by_image"])
@pytest.mark.parametrize("which", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gradients_equal_embedding_bag(monkeypatch, path, which, index_dtype):
    monkeypatch.setenv("GROUNDING_DINO_NATIVE_KERNELS", "1" if path == "native" else "0")
    monkeypatch.setattr(module, "DENSE_BACKWARD_LIMIT", 1 << 30 if path == "dense" else 0)
    if path == "native":
        assert module.weighted_gather_backward_kernel(torch.float64, index_dtype) is not None
    table, rows, weights, probe = make_inputs()
    inputs = table, rows.to(index_dtype), weights, probe
    expected = _gradients(_reference, *inputs, which=which)
    got = _gradients(lambda t, r, w: weighted_gather(t, r, w, BATCH, HEADS), *inputs, which=which)
    assert len(got) == len(expected) == 1 + sum(which)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert all(g.abs().sum() > 0 for g in got[1:])


def test_without_gradients_it_is_embedding_bag():
    table, rows, weights, _ = make_inputs(dtype=torch.float32)
    with torch.no_grad():
        out = weighted_gather(table, rows, weights, BATCH, HEADS)
    assert torch.equal(out, F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights))
    torch.testing.assert_close(out, _reference(table, rows, weights))
