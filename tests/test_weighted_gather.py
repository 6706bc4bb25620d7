"""The weighted gather's gradients in PyTorch (the deformable sampling's backward without its
compiled kernel) equal autograd's through the written-out sum, on both paths (dense per-block
products and image by image)."""

import pytest
import torch

from grounding_dino.modeling import weighted_gather as module
from grounding_dino.modeling.weighted_gather import weighted_gather_gradients

BATCH, HEADS, QUERIES, PIXELS, CORNERS, DIM = 3, 4, 7, 13, 10, 5


def make_inputs(seed=0, dtype=torch.float64):
    """(table, int32 rows, weights, probe) of a weighted gather: each bag reads rows of its own
    image and head."""
    batch, heads, queries, pixels, corners, dim = BATCH, HEADS, QUERIES, PIXELS, CORNERS, DIM
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


@pytest.mark.parametrize("path", ["dense", "image_by_image"])
@pytest.mark.parametrize("which", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gradients_equal_autograd(monkeypatch, path, which, index_dtype):
    monkeypatch.setattr(module, "DENSE_BACKWARD_LIMIT", 1 << 30 if path == "dense" else 0)
    table, rows, weights, probe = make_inputs()
    rows = rows.to(index_dtype)
    expected = _gradients(_reference, table, rows, weights, probe, which=which)[1:]
    got = weighted_gather_gradients(table, rows, weights, probe, BATCH, HEADS, *which)
    got = [g for g in got if g is not None]
    assert len(got) == len(expected) == sum(which)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert all(g.abs().sum() > 0 for g in got)
    assert rows.equal(make_inputs()[1].to(index_dtype))  # the indices are left as they were


@pytest.mark.parametrize("path", ["dense", "image_by_image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_run_under_the_flop_counter(monkeypatch, path, dtype):
    """The training benchmark counts a step's GFLOP with torch's ``FlopCounterMode``, which in
    torch 2.3 fails on products written with ``out=``: both paths run under it, in fp32 and in
    bfloat16 (the backward of a bf16-autocast step without the compiled kernel), and give the
    gradients they give without it."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(module, "DENSE_BACKWARD_LIMIT", 1 << 30 if path == "dense" else 0)
    table, rows, weights, probe = (
        t if t.dtype == torch.int32 else t.to(dtype) for t in make_inputs()
    )
    plain = weighted_gather_gradients(table, rows, weights, probe, BATCH, HEADS, True, True)
    with FlopCounterMode(display=False) as counter:
        counted = weighted_gather_gradients(table, rows, weights, probe, BATCH, HEADS, True, True)
    for a, b in zip(counted, plain):
        assert a.dtype == dtype and torch.equal(a, b)
    assert counter.get_total_flops() > 0  # the weights' gradient is a batched product
