"""Training memory: the deformable attention's bounded-memory backward gives the reference's
gradients (transformers' pure-PyTorch module and the ``grid_sample`` kernel, alone and inside a
whole model's training loss), and activation checkpointing changes neither losses nor
gradients."""

import pytest
import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from grounding_dino.model_zoo import get_config
from grounding_dino.modeling import native_kernels, weighted_gather
from grounding_dino.modeling.deformable_attention import (
    MultiScaleDeformableAttention,
    deformable_kernel,
)
from grounding_dino.text.positive_map import positive_map_from_spans

SHAPES = [(9, 11), (5, 6), (3, 3), (1, 2)]


@pytest.fixture(params=["native", "dense", "image_by_image"])
def backward_path(request, monkeypatch):
    """Each backward path of the weighted gather: the compiled CPU kernel, and without it the
    dense one and the image-by-image one in chunks of 5 bags (the last one partial)."""
    monkeypatch.setenv("GROUNDING_DINO_NATIVE_KERNELS", "1" if request.param == "native" else "0")
    if request.param == "native":
        assert native_kernels.bilinear_sampling_backward_kernel(torch.float64)
    elif request.param == "dense":
        monkeypatch.setattr(weighted_gather, "DENSE_BACKWARD_LIMIT", 1 << 30)
    else:
        monkeypatch.setattr(weighted_gather, "DENSE_BACKWARD_LIMIT", 0)
        monkeypatch.setattr(weighted_gather, "WEIGHTS_GRADIENT_CHUNK", 5 * 4 * 3 * 4 * 8)
    return request.param


def _transformers_module(ours: MultiScaleDeformableAttention):
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMultiscaleDeformableAttention,
    )

    config = GroundingDinoConfig(d_model=ours.embed_dim, num_feature_levels=ours.num_levels)
    reference = GroundingDinoMultiscaleDeformableAttention(config, ours.num_heads, ours.num_points)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return reference.double().train()


@pytest.mark.parametrize("box", [False, True])
def test_deformable_attention_gradients_equal_transformers(backward_path, box):
    torch.manual_seed(0)
    ours = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=3)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    reference = _transformers_module(ours)
    ours = ours.double().train()
    gen = torch.Generator().manual_seed(1)
    spatial = torch.tensor(SHAPES)
    areas = spatial.prod(1)
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    batch, queries, num_values = 2, 17, int(areas.sum())
    query = torch.randn(batch, queries, 32, dtype=torch.float64, generator=gen)
    value = torch.randn(batch, num_values, 32, dtype=torch.float64, generator=gen)
    ref = torch.rand(batch, queries, 4, 4 if box else 2, dtype=torch.float64, generator=gen)
    ref = ref * 1.4 - 0.2  # beyond [0, 1]: the zero padding
    if box:
        ref[..., 2:] = ref[..., 2:].abs() + 0.05
    mask = torch.ones(batch, num_values, dtype=torch.bool)
    mask[-1, ::3] = False
    probe = torch.randn(batch, queries, 32, dtype=torch.float64, generator=gen)

    def gradients(module, call):
        inputs = [query.clone().requires_grad_(), value.clone().requires_grad_()]
        out = call(module, *inputs)
        wanted = inputs + list(module.parameters())
        return [out] + list(torch.autograd.grad((out * probe).sum(), wanted))

    got = gradients(ours, lambda m, q, v: m(q, ref, v, spatial, start, value_mask=mask))
    expected = gradients(
        reference,
        lambda m, q, v: m(
            q,
            attention_mask=mask,
            encoder_hidden_states=v,
            reference_points=ref,
            spatial_shapes=spatial,
            spatial_shapes_list=[tuple(s) for s in SHAPES],
            level_start_index=start,
        )[0],
    )
    assert len(got) == len(expected) == 3 + len(list(ours.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # Every parameter, the sampling offsets included, gets a gradient.
    assert all(g.abs().sum() > 0 for g in got[1:])


CAPTION = "red square . blue circle ."


def _batch(tokenizer):
    """Two 96x128 images with captioned boxes (the second with one box)."""
    tokenized = tokenizer(CAPTION, return_offsets_mapping=True)
    gen = torch.Generator().manual_seed(0)
    records = []
    for boxes, spans, classes in (
        ([[8.0, 10.0, 48.0, 40.0], [60.0, 30.0, 110.0, 80.0]], [[(0, 10)], [(13, 24)]], [0, 1]),
        ([[20.0, 20.0, 70.0, 90.0]], [[(13, 24)]], [1]),
    ):
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        instances.gt_positive_map = positive_map_from_spans(tokenized, spans, 256)
        image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=gen)
        records.append({"image": image, "caption": CAPTION, "instances": instances})
    return records


@pytest.fixture(scope="module")
def tiny_training_model():
    """``shapes_tiny``'s model (denoising on, 40 queries) in training mode, dropout on in the
    enhancer and decoder so that recomputation must replay the random numbers."""
    cfg = get_config("shapes_tiny.py").model
    cfg.enhancer.dropout = 0.1
    cfg.decoder.dropout = 0.1
    cfg.query_selector.num_queries = 40  # a 96x128 image has 65 feature positions
    torch.manual_seed(0)
    model = instantiate(cfg).train()
    # At initialisation the enhancer's sampling points lie exactly on pixel centres (cell
    # centres plus integer offsets), kinks of the bilinear interpolation where the two
    # formulations take different one-sided derivatives (pixel coordinates computed directly,
    # or through grid_sample's [-1, 1] coordinates, which round to just below the integer).
    # Noise on the offsets' biases moves the points off the kinks, as any training step does.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def _losses_and_gradients(model):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same denoising noise, dropout and drop path in every call
    with EventStorage():
        losses = model(_batch(model.tokenizer))
    sum(losses.values()).backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, gradients


def _assert_equal(first, second, rtol):
    (losses_a, grads_a), (losses_b, grads_b) = first, second
    assert losses_a.keys() == losses_b.keys() and "loss_class_dn" in losses_a
    for name in losses_a:
        torch.testing.assert_close(losses_a[name], losses_b[name], rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name, grad in grads_a.items():
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grad, grads_b[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("native", [True, False])
def test_tiny_model_training_gradients_equal_grid_sample_kernel(
    tiny_training_model, monkeypatch, native
):
    """The whole training loss (matching, denoising, every layer): our kernel with its compiled
    CPU backward, or without it the image-by-image backward (the one of large images), against
    the reference formulation (per-level ``grid_sample``, autograd's backward)."""
    monkeypatch.setenv("GROUNDING_DINO_NATIVE_KERNELS", "1" if native else "0")
    monkeypatch.setattr(weighted_gather, "DENSE_BACKWARD_LIMIT", 0)
    monkeypatch.setattr(weighted_gather, "WEIGHTS_GRADIENT_CHUNK", 1000 * 64 * 16)
    model = tiny_training_model
    ours = _losses_and_gradients(model)
    with deformable_kernel(model, "grid_sample"):
        reference = _losses_and_gradients(model)
    _assert_equal(ours, reference, rtol=5e-5)
    sampling = "enhancer.layers.0.image_layer.self_attn.sampling_offsets.weight"
    assert ours[1][sampling].abs().sum() > 0


@pytest.mark.parametrize("enhancer_dropout", [0.1, 0.0])  # 0: the chunked FFN is checkpointed
def test_activation_checkpointing_gives_equal_losses_and_gradients(
    tiny_training_model, monkeypatch, enhancer_dropout
):
    model = tiny_training_model
    for layer in model.enhancer.layers:
        monkeypatch.setattr(layer.image_layer.dropout, "p", enhancer_dropout)
    assert not model.enhancer.use_checkpoint and not model.decoder.use_checkpoint
    plain = _losses_and_gradients(model)
    model.enhancer.use_checkpoint = model.decoder.use_checkpoint = True
    try:
        checkpointed = _losses_and_gradients(model)
    finally:
        model.enhancer.use_checkpoint = model.decoder.use_checkpoint = False
    # Recomputation replays the same operations on the same inputs: equal to rounding.
    _assert_equal(plain, checkpointed, rtol=1e-5)


def _with_saved(forward, *args):
    """``forward(*args)``'s result and the tensors autograd kept for its backward."""
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        return forward(*args), saved


def test_layer_norm_linear_equals_the_two_modules_and_saves_one_tensor_less():
    """``layer_norm_linear`` gives the norm's and the linear layer's outputs and every gradient
    bit for bit, and keeps the norm's input but not its output for the backward."""
    from grounding_dino.modeling.recomputed_linear import layer_norm_linear

    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 50, 32)
    results = []
    for fused in (False, True):
        inputs = x.clone().requires_grad_()
        norm.zero_grad(set_to_none=True)
        linear.zero_grad(set_to_none=True)
        if fused:
            (normed, out), saved = _with_saved(layer_norm_linear, inputs, norm, linear)
        else:
            normed, saved = _with_saved(norm, inputs)
            out, saved_by_linear = _with_saved(linear, normed)
            saved += saved_by_linear
        # The normalised tensor also goes on (a residual), as in the enhancer.
        (normed.sin().sum() + out.cos().sum()).backward()
        grads = [inputs.grad] + [p.grad for p in (*norm.parameters(), *linear.parameters())]
        activations = {t.data_ptr() for t in saved if t.numel() == x.numel()}
        results.append(([normed, out] + grads, len(activations)))
    for reference, ours in zip(results[0][0], results[1][0]):
        assert torch.equal(reference, ours)
    assert results[0][1] == 2 and results[1][1] == 1


@pytest.mark.parametrize("enhancer_dropout", [0.1, 0.0])
def test_recomputing_linears_in_the_model_give_equal_losses_and_gradients(
    tiny_training_model, monkeypatch, enhancer_dropout
):
    """The whole training loss with the enhancer's FFN recomputed (``chunked_ffn``, without
    dropout; ``layer_norm_linear`` with it), ``sum_linear`` (deformable attention of the
    enhancer) and the value tables rebuilt in the backward (every deformable attention)
    against the plain modules."""
    from grounding_dino.modeling import deformable_attention, enhancer

    model = tiny_training_model
    layers = [layer.image_layer for layer in model.enhancer.layers]
    for layer in layers:
        monkeypatch.setattr(layer.dropout, "p", enhancer_dropout)
    calls = []
    attention = deformable_attention.MultiScaleDeformableAttention
    rebuilt_table = attention._rebuilt_table

    def counted_rebuild(self, *args):
        calls.append("table")
        return rebuilt_table(self, *args)

    def counted(name, function):
        def call(*args):
            calls.append(name)
            return function(*args)

        return call

    monkeypatch.setattr(attention, "_rebuilt_table", counted_rebuild)
    monkeypatch.setattr(enhancer, "chunked_ffn", counted("ffn", enhancer.chunked_ffn))
    monkeypatch.setattr(enhancer, "layer_norm_linear", counted("norm", enhancer.layer_norm_linear))
    fused = _losses_and_gradients(model)
    attentions = [m for m in model.modules() if isinstance(m, attention)]
    assert calls.count("table") == len(attentions) > len(layers)
    recomputed = "ffn" if enhancer_dropout == 0 else "norm"
    assert calls.count(recomputed) == len(layers) and len(calls) == len(attentions) + len(layers)
    calls.clear()

    def plain_norm_linear(x, norm, linear):
        calls.append("plain norm")
        normed = norm(x)
        return normed, linear(normed)

    def plain_sum_linear(x, pos, weight, bias):
        calls.append("sum")
        return torch.nn.functional.linear(x + pos, weight, bias)

    monkeypatch.setattr(enhancer, "can_chunk", lambda *modules: False)
    monkeypatch.setattr(enhancer, "layer_norm_linear", plain_norm_linear)
    monkeypatch.setattr(deformable_attention, "sum_linear", plain_sum_linear)
    monkeypatch.setattr(attention, "_rebuildable", lambda self: False)
    reference = _losses_and_gradients(model)
    assert calls.count("plain norm") == len(layers) and calls.count("sum") == 2 * len(layers)
    assert "table" not in calls and "ffn" not in calls
    _assert_equal(fused, reference, rtol=1e-6)


@pytest.mark.parametrize("pos_shape", [(2, 50, 32), (1, 50, 32)])
def test_sum_linear_equals_linear_of_the_sum_and_keeps_no_sum(pos_shape):
    from grounding_dino.modeling.recomputed_linear import sum_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 64)
    x, pos = torch.randn(2, 50, 32), torch.randn(pos_shape)
    results = []
    for fused in (False, True):
        inputs, position = x.clone().requires_grad_(), pos.clone().requires_grad_()
        linear.zero_grad(set_to_none=True)
        if fused:
            out, saved = _with_saved(sum_linear, inputs, position, linear.weight, linear.bias)
        else:
            out, saved = _with_saved(lambda a, b: linear(a + b), inputs, position)
        out.cos().sum().backward()
        grads = [inputs.grad, position.grad, linear.weight.grad, linear.bias.grad]
        kept = {t.data_ptr() for t in saved} - {p.data_ptr() for p in linear.parameters()}
        summed_kept = not kept <= {inputs.data_ptr(), position.data_ptr(), out.data_ptr()}
        results.append((out, grads, summed_kept))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for reference, ours in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert results[0][2] and not results[1][2]


def test_layer_norm_linear_calls_a_wrapped_linear_layer():
    """A linear layer that is not exactly ``nn.Linear`` (a LoRA adapter adds its own weights)
    is called, not read: its output and its own parameters' gradients are kept."""
    from grounding_dino.modeling.recomputed_linear import layer_norm_linear

    class Adapted(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 4)
            self.extra = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return super().forward(x) * self.extra

    norm, linear = torch.nn.LayerNorm(8), Adapted()
    with torch.no_grad():
        linear.extra.fill_(3.0)
    x = torch.randn(5, 8, requires_grad=True)
    normed, out = layer_norm_linear(x, norm, linear)
    torch.testing.assert_close(
        out, torch.nn.functional.linear(norm(x), linear.weight) * 3 + linear.bias * 3
    )
    out.sum().backward()
    assert linear.extra.grad is not None and linear.extra.grad.abs().sum() > 0
