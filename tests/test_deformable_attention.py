"""Multi-scale deformable attention against transformers' pure-PyTorch implementation."""

import pytest
import torch

from grounding_dino.modeling.deformable_attention import (
    MultiScaleDeformableAttention,
    ms_deform_attn_embedding_bag,
    ms_deform_attn_grid_sample,
)

SHAPES = [(9, 11), (5, 6), (3, 3), (1, 2)]


def _levels(shapes=SHAPES):
    spatial = torch.tensor(shapes, dtype=torch.long)
    areas = spatial[:, 0] * spatial[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial, start, int(areas.sum())


def _hf_module(ours: MultiScaleDeformableAttention):
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMultiscaleDeformableAttention,
    )

    config = GroundingDinoConfig(d_model=ours.embed_dim, num_feature_levels=ours.num_levels)
    hf = GroundingDinoMultiscaleDeformableAttention(config, ours.num_heads, ours.num_points)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.eval()


def _inputs(batch, queries, box, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial, start, num_values = _levels()
    query = torch.randn(batch, queries, 32, generator=gen)
    value = torch.randn(batch, num_values, 32, generator=gen)
    # Points beyond [0, 1] exercise the zero padding.
    ref = torch.rand(batch, queries, len(SHAPES), 4 if box else 2, generator=gen) * 1.4 - 0.2
    if box:
        ref[..., 2:] = ref[..., 2:].abs() + 0.05
    mask = torch.ones(batch, num_values, dtype=torch.bool)
    mask[-1, ::3] = False
    return query, ref, value, spatial, start, mask


@pytest.mark.parametrize("kernel", ["embedding_bag", "grid_sample"])
@pytest.mark.parametrize("box", [False, True])
def test_matches_transformers(kernel, box):
    torch.manual_seed(0)
    ours = MultiScaleDeformableAttention(
        embed_dim=32, num_heads=4, num_levels=4, num_points=3, kernel=kernel
    )
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf = _hf_module(ours)
    query, ref, value, spatial, start, mask = _inputs(2, 17, box)
    with torch.no_grad():
        got = ours(query, ref, value, spatial, start, value_mask=mask)
        expected, _ = hf(
            query,
            attention_mask=mask,
            encoder_hidden_states=value,
            reference_points=ref,
            spatial_shapes=spatial,
            spatial_shapes_list=[tuple(s) for s in spatial.tolist()],
            level_start_index=start,
        )
    assert got.shape == (2, 17, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The mask matters: without it the output changes.
    with torch.no_grad():
        unmasked = ours(query, ref, value, spatial, start)
    assert (unmasked[-1] - got[-1]).abs().max() > 1e-3


def test_kernels_agree_in_values_and_gradients():
    spatial, start, num_values = _levels()
    gen = torch.Generator().manual_seed(1)
    value = torch.randn(2, num_values, 3, 4, dtype=torch.float64, generator=gen)
    loc = torch.rand(2, 7, 3, 4, 2, 2, dtype=torch.float64, generator=gen) * 1.6 - 0.3
    weights = torch.rand(2, 7, 3, 4, 2, dtype=torch.float64, generator=gen)
    probe = torch.randn(2, 7, 12, dtype=torch.float64, generator=gen)
    results = []
    for kernel in (ms_deform_attn_embedding_bag, ms_deform_attn_grid_sample):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        out = kernel(inputs[0], spatial, start, inputs[1], inputs[2])
        grads = torch.autograd.grad((out * probe).sum(), inputs)
        results.append((out,) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert results[0][2].abs().sum() > 0  # locations get gradients


def test_bilinear_exact_on_known_map():
    """A linear ramp is reproduced exactly inside the map; outside it fades to zero."""
    spatial, start = torch.tensor([[4, 5]]), torch.tensor([0])
    ramp = torch.arange(20, dtype=torch.float32).view(1, 20, 1, 1)  # value = 5*y + x
    loc = torch.tensor([[0.5, 0.5], [0.3, 0.625], [1.1, 0.5], [-0.1, 0.5]]).view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1)
    out = ms_deform_attn_embedding_bag(ramp, spatial, start, loc, weights).view(4)
    # (x, y) pixel = (0.5*5-0.5, 0.5*4-0.5) = (2, 1.5) -> 5*1.5 + 2 = 9.5
    # (0.3*5-0.5, 0.625*4-0.5) = (1, 2) -> 11; x = 5.0 is beyond the last column (4) by
    # one pixel: zero; x = -1.0: zero.
    torch.testing.assert_close(out, torch.tensor([9.5, 11.0, 0.0, 0.0]))


def test_default_init_and_errors():
    attn = MultiScaleDeformableAttention(embed_dim=256, num_heads=8, num_levels=4, num_points=4)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=8, num_levels=4, num_points=4)
    with pytest.raises(ValueError, match="kernel"):
        MultiScaleDeformableAttention(
            embed_dim=32, num_heads=4, num_levels=4, num_points=4, kernel="cuda"
        )
    with pytest.raises(TypeError):  # keyword-only, every model setting required
        MultiScaleDeformableAttention(32, 4, 4, 4)
    spatial, start, num_values = _levels()
    small = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=2)
    with pytest.raises(ValueError, match="reference_points"):
        small(torch.zeros(1, 3, 32), torch.zeros(1, 3, 4, 3), torch.zeros(1, num_values, 32),
              spatial, start)  # fmt: skip
    with pytest.raises(ValueError, match="spatial_shapes"):
        small(torch.zeros(1, 3, 32), torch.zeros(1, 3, 4, 2), torch.zeros(1, num_values, 32),
              spatial[:3], start[:3])  # fmt: skip


def test_padded_value_table_is_the_zero_bordered_copy_and_its_gradient_the_slices():
    """The table built by split/pad/cat equals a zero table with every level assigned in place
    (the earlier construction), and its gradient is exactly the probe's level slices."""
    from grounding_dino.modeling.deformable_kernels import padded_value_table

    spatial, start, num_values = _levels()
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(2, num_values, 3, 4, generator=gen, requires_grad=True)
    padded = padded_value_table(value, spatial, start)
    expected = value.new_zeros(padded.table.shape)
    probe = torch.randn(padded.table.shape, generator=gen)
    expected_grad = torch.empty_like(value)
    for (h, w), first, row in zip(SHAPES, start.tolist(), padded.padded_starts):
        level = expected[:, row : row + (h + 3) * (w + 3)].view(2, h + 3, w + 3, -1)
        level[:, 1 : h + 1, 1 : w + 1] = value[:, first : first + h * w].view(2, h, w, -1)
        probe_level = probe[:, row : row + (h + 3) * (w + 3)].view(2, h + 3, w + 3, 3, 4)
        expected_grad[:, first : first + h * w] = probe_level[:, 1 : h + 1, 1 : w + 1].flatten(1, 2)
    assert torch.equal(padded.table, expected)
    (grad,) = torch.autograd.grad((padded.table * probe).sum(), value)
    assert torch.equal(grad, expected_grad)
    with pytest.raises(ValueError, match="level_start_index"):
        padded_value_table(value, spatial, start.flip(0))
