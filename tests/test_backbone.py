"""Parity of the Swin body, input projections and position embedding with the official
Grounding DINO code and with transformers; batch invariance of ``forward_images``; freezing
and checkpointing of the Swin body."""

import copy

import pytest
import torch
from torch import nn

from grounding_dino.convert.keys import (
    convert_hf_input_proj_state_dict,
    convert_official_input_proj_state_dict,
)
from grounding_dino.convert.swin_sources import (
    convert_hf_swin_state_dict,
    convert_official_swin_state_dict,
)
from grounding_dino.modeling.backbone import (
    SWIN_VARIANTS,
    InputProjectionNeck,
    PositionEmbeddingSine,
    ResNetBackbone,
    SwinBackbone,
    TinyCNNBackbone,
)
from grounding_dino.modeling.registry import IMAGE_BACKBONE_REGISTRY, build_image_backbone
from grounding_dino.modeling.backbone import swin as swin_module

from padded_reference import forward_padded

TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7)
ATOL = 1e-5


def _perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random offsets on every parameter so that no zero bias or unit norm hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _images(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _swin(frozen_stages=-1, use_checkpoint=False, **sizes) -> SwinBackbone:
    return SwinBackbone(
        variant={**TINY, **sizes},
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        frozen_stages=frozen_stages,
        use_checkpoint=use_checkpoint,
    )


def _official_swin(frozen_stages=-1):
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import (
        SwinTransformer as OfficialSwin,
    )

    ref = OfficialSwin(
        pretrain_img_size=224,
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        frozen_stages=frozen_stages,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
    )
    ref.eval()  # the official train() returns None
    return ref


@pytest.mark.parametrize("size", [(100, 130), (61, 37)])
def test_swin_matches_official(size):
    ref = _perturb(_official_swin())
    ours = _swin().eval()
    ours.load_state_dict(convert_official_swin_state_dict(ref.state_dict()), strict=True)
    x = _images(2, 3, *size)
    with torch.no_grad():
        expected = ref.forward_raw(x)
        got = ours(x)
    assert list(got) == ["p1", "p2", "p3"]
    for e, g in zip(expected, got.values()):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _hf_tiny_grounding_dino():
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoModel

    swin = SwinConfig(
        embed_dim=TINY["embed_dim"],
        depths=list(TINY["depths"]),
        num_heads=list(TINY["num_heads"]),
        window_size=TINY["window_size"],
        out_indices=[2, 3, 4],
        drop_path_rate=0.0,
    )
    text = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=text,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        num_feature_levels=4,
    )
    torch.manual_seed(0)
    model = GroundingDinoModel(config).eval()
    _perturb(model.backbone)
    _perturb(model.input_proj_vision)
    return model


def _hf_image_features(model, images, pixel_mask):
    """The image part of transformers' ``GroundingDinoModel.forward`` (same glue lines)."""
    vision_features, pos = model.backbone(images, pixel_mask)
    features, masks = [], []
    for level, (source, mask) in enumerate(vision_features):
        features.append(model.input_proj_vision[level](source))
        masks.append(mask)
    for level in range(len(features), model.config.num_feature_levels):
        src = vision_features[-1][0] if level == len(vision_features) else features[-1]
        source = model.input_proj_vision[level](src)
        mask = nn.functional.interpolate(pixel_mask[None].float(), size=source.shape[-2:])
        mask = mask.to(torch.bool)[0]
        pos.append(model.backbone.position_embedding(source, mask).to(source.dtype))
        features.append(source)
        masks.append(mask)
    return features, masks, pos


def test_swin_matches_transformers():
    hf = _hf_tiny_grounding_dino().backbone.conv_encoder.model
    ours = _swin().eval()
    ours.load_state_dict(convert_hf_swin_state_dict(hf.state_dict()), strict=True)
    x = _images(2, 3, 100, 130)
    with torch.no_grad():
        expected = hf(x).feature_maps
        got = ours(x)
    for e, g in zip(expected, got.values()):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _neck():
    return InputProjectionNeck(in_channels=(64, 128, 256), hidden_dim=64, num_feature_levels=4)


def test_image_side_matches_transformers_padded_batch():
    hf = _hf_tiny_grounding_dino()
    body, neck = _swin().eval(), _neck().eval()
    hf_sd = hf.state_dict()
    body.load_state_dict(
        convert_hf_swin_state_dict(
            {k[len("backbone.conv_encoder.model.") :]: v for k, v in hf_sd.items()
             if k.startswith("backbone.conv_encoder.model.")}
        ),
        strict=True,
    )  # fmt: skip
    neck.load_state_dict(convert_hf_input_proj_state_dict(hf.input_proj_vision.state_dict()))
    position = PositionEmbeddingSine(hidden_dim=64, temperature=20.0)
    images = _images(2, 3, 100, 130)
    pixel_mask = torch.ones(2, 100, 130, dtype=torch.bool)
    pixel_mask[1, 70:] = False
    pixel_mask[1, :, 90:] = False
    images[1][:, ~pixel_mask[1]] = 0
    with torch.no_grad():
        expected = _hf_image_features(hf, images, pixel_mask.long())
        maps, masks = forward_padded(neck, body, images, pixel_mask)
        got = (maps, masks, [position(m) for m in masks])
    for exp_list, got_list in zip(expected, got):
        assert len(got_list) == 4
        for e, g in zip(exp_list, got_list):
            assert g.shape == e.shape
            # Instruction set, not logic: AVX2 kernels sum Swin's matmuls and the 256x3x3 conv in
            # another order than AVX-512's; GroupNorm'd maps have |x| up to ~6. Max |diff| over 20
            # image seeds: 7.4e-6 on AVX-512, 1.15e-5 (at |x| = 0.51, level 3) on AVX2 (a fresh
            # AVX2 machine measured the same 1.15e-5); atol 1e-5 + rtol 2e-5 leaves 1.75x there.
            torch.testing.assert_close(g, e.to(g.dtype), atol=ATOL, rtol=2e-5)
    assert [tuple(f.shape[-2:]) for f in maps] == [(13, 17), (7, 9), (4, 5), (2, 3)]


def test_position_embedding_matches_official_and_transformers():
    from groundingdino.models.GroundingDINO.backbone.position_encoding import (
        PositionEmbeddingSineHW as OfficialPE,
    )
    from groundingdino.util.misc import NestedTensor
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoSinePositionEmbedding,
    )

    valid = torch.ones(2, 9, 11, dtype=torch.bool)
    valid[1, 6:] = False
    valid[1, :, 4:] = False
    position = PositionEmbeddingSine(hidden_dim=256, temperature=20.0)
    ours = position(valid)
    official = OfficialPE(128, temperatureH=20, temperatureW=20, normalize=True)(
        NestedTensor(torch.zeros(2, 3, 9, 11), ~valid)
    )
    hf = GroundingDinoSinePositionEmbedding(GroundingDinoConfig(d_model=256))(
        torch.zeros(2, 3, 9, 11), valid.long()
    )
    assert ours.shape == (2, 256, 9, 11)
    torch.testing.assert_close(ours, official, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=0)
    # A valid position's embedding ignores the padding after it.
    alone = position(torch.ones(1, 6, 4, dtype=torch.bool))
    torch.testing.assert_close(ours[1:, :, :6, :4], alone, atol=1e-6, rtol=0)
    # Another temperature changes both directions, as the official HW embedding's.
    official_10 = OfficialPE(32, temperatureH=10, temperatureW=10, normalize=True)(
        NestedTensor(torch.zeros(2, 3, 9, 11), ~valid)
    )
    ours_10 = PositionEmbeddingSine(hidden_dim=64, temperature=10.0)(valid)
    torch.testing.assert_close(ours_10, official_10, atol=1e-6, rtol=0)


def test_neck_official_input_proj_layout():
    """Official ``input_proj.<l>.{0,1}`` Sequentials map onto the neck and compute the same."""
    neck = _perturb(_neck())
    official = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(c, 64, 1), nn.GroupNorm(32, 64)) for c in (64, 128, 256)]
        + [nn.Sequential(nn.Conv2d(256, 64, 3, 2, 1), nn.GroupNorm(32, 64))]
    )
    _perturb(official, seed=3)
    neck.load_state_dict(convert_official_input_proj_state_dict(official.state_dict()), strict=True)
    features = [_images(1, c, s, s + 2, seed=c) for c, s in ((64, 20), (128, 10), (256, 5))]
    with torch.no_grad():
        got = neck(features)
        expected = [official[i](f) for i, f in enumerate(features)] + [official[3](features[-1])]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_forward_images_is_batch_invariant():
    body, neck = _perturb(_swin()).eval(), _perturb(_neck(), seed=1).eval()
    position = PositionEmbeddingSine(hidden_dim=64, temperature=20.0)
    # ``small`` is taller and narrower than ``large``: every level pads in both directions.
    # ``same`` has the size of ``small``, so the two run as one group.
    small, large = _images(3, 130, 75, seed=2), _images(3, 100, 130, seed=3)
    same = _images(3, 130, 75, seed=4)
    with torch.no_grad():
        maps, masks = neck.forward_images(body, [small, large, same])
        pos = [position(m) for m in masks]
        for i, image in enumerate([small, large, same]):
            m1, k1 = neck.forward_images(body, [image])
            for level in range(4):
                h, w = m1[level].shape[-2:]
                assert k1[level].all()
                assert masks[level][i].sum() == h * w
                assert masks[level][i, :h, :w].all()
                torch.testing.assert_close(
                    maps[level][i, :, :h, :w], m1[level][0], atol=ATOL, rtol=0
                )
                torch.testing.assert_close(
                    pos[level][i, :, :h, :w], position(k1[level])[0], atol=ATOL, rtol=0
                )
                assert maps[level][i, :, h:].abs().sum() == 0
        # The padded batch of the reference way differs (this is why forward_images exists).
        padded = torch.zeros(2, 3, 130, 130)
        padded[0, :, :, :75] = small
        padded[1, :, :100] = large
        ref_maps, _ = forward_padded(neck, body, padded, torch.ones(2, 130, 130, dtype=torch.bool))
        assert (ref_maps[0][0, :, :17, :10] - maps[0][0, :, :17, :10]).abs().max() > 1e-3


def test_variants_registry_and_errors():
    assert SWIN_VARIANTS["swin_T_224_1k"] == (96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert SWIN_VARIANTS["swin_B_384_22k"] == (128, (2, 2, 18, 2), (4, 8, 16, 32), 12)
    assert SWIN_VARIANTS["swin_L"] == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    for body in (SwinBackbone, ResNetBackbone, TinyCNNBackbone):
        assert IMAGE_BACKBONE_REGISTRY.get(body.__name__) is body
    args = dict(out_indices=(1, 2, 3), drop_path_rate=0.2, frozen_stages=-1, use_checkpoint=False)
    swin_b = build_image_backbone(name="SwinBackbone", variant="swin_B_384_22k", **args)
    shapes = swin_b.output_shape()
    assert [(s.channels, s.stride) for s in shapes.values()] == [(256, 8), (512, 16), (1024, 32)]
    assert swin_b.size_divisibility == 32
    assert swin_b.layers[0].blocks[0].attn.window_size == (12, 12)
    InputProjectionNeck(in_channels=(256, 512, 1024), hidden_dim=256, num_feature_levels=4)
    with pytest.raises(ValueError, match="swin_X"):
        SwinBackbone(variant="swin_X", **args)
    with pytest.raises(ValueError, match="out_indices"):
        SwinBackbone(variant="swin_T_224_1k", **{**args, "out_indices": (1, 4)})
    with pytest.raises(ValueError, match="hidden_dim"):
        InputProjectionNeck(in_channels=(64, 128, 256), hidden_dim=48, num_feature_levels=4)
    with pytest.raises(ValueError, match="num_feature_levels"):
        InputProjectionNeck(in_channels=(64, 128, 256), hidden_dim=64, num_feature_levels=2)
    body, neck = _swin().eval(), _neck()
    with pytest.raises(ValueError, match="pixel_mask"):
        forward_padded(
            neck, body, torch.zeros(1, 3, 32, 32), torch.ones(1, 16, 16, dtype=torch.bool)
        )
    wrong = InputProjectionNeck(in_channels=(192, 384, 768), hidden_dim=64, num_feature_levels=4)
    with pytest.raises(ValueError, match=r"in_channels \(192, 384, 768\).*\(64, 128, 256\)"):
        wrong.check_backbone(body)
    with pytest.raises(ValueError, match="in_channels"):
        wrong.forward_images(body, [torch.zeros(3, 32, 32)])


@pytest.mark.parametrize("variant", ["swin_T_224_1k", "swin_B_384_22k"])
def test_official_swin_keys_convert(variant):
    """Every key of the official Swin maps onto ours, with the same shape."""
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import (
        build_swin_transformer as official_build,
    )

    size = 384 if "384" in variant else 224
    ref = official_build(variant, size, out_indices=(1, 2, 3))
    ours = SwinBackbone(
        variant=variant, out_indices=(1, 2, 3), drop_path_rate=0.2, frozen_stages=-1,
        use_checkpoint=False,
    )  # fmt: skip
    converted = convert_official_swin_state_dict(ref.state_dict())
    ours_sd = ours.state_dict()
    assert set(converted) == set(ours_sd)
    assert all(converted[k].shape == ours_sd[k].shape for k in ours_sd)


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 3, 5])
def test_swin_freezing_matches_official(frozen_stages):
    """``frozen_stages`` freezes exactly the official model's parameters, and they stay in
    eval mode under ``train()`` (no stochastic depth), as the official model's."""
    ref = _official_swin(frozen_stages)
    ref.train()
    ours = _swin(frozen_stages).train()
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in ref.named_parameters() if not p.requires_grad}
    expected_frozen_stages = max(0, frozen_stages - 1)
    assert len({n.split(".")[1] for n in frozen if n.startswith("layers.")}) == min(
        expected_frozen_stages, 4
    )
    assert any(n.startswith("patch_embed.") for n in frozen) == (frozen_stages >= 0)
    assert ours.patch_embed.training == (frozen_stages < 0)
    for i, layer in enumerate(ours.layers):
        assert layer.training == (i >= expected_frozen_stages)
        assert layer.training == ref.layers[i].training


@pytest.mark.parametrize("use_checkpoint", [True, (0, 2), [1]])
def test_swin_checkpointing_gives_the_same_gradients_with_a_frozen_stem(
    use_checkpoint, monkeypatch
):
    """Non-reentrant checkpointing of every stage or of some: gradients reach every trainable
    parameter even when the input of the first block does not require one (detectron2's
    reentrant one gives none)."""
    plain = _perturb(_swin(frozen_stages=2)).train()
    checkpointed = _swin(frozen_stages=2, use_checkpoint=use_checkpoint).train()
    checkpointed.load_state_dict(plain.state_dict())
    recomputed = []
    checkpoint = swin_module.checkpoint.checkpoint

    def recording_checkpoint(layer, *args, **kwargs):
        recomputed.append(list(checkpointed.layers).index(layer))
        return checkpoint(layer, *args, **kwargs)

    monkeypatch.setattr(swin_module.checkpoint, "checkpoint", recording_checkpoint)
    x = _images(1, 3, 64, 80)
    for model in (plain, checkpointed):
        sum(o.square().sum() for o in model(x).values()).backward()
    expected = [0, 1, 2, 3] if use_checkpoint is True else list(use_checkpoint)
    assert recomputed == expected
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert grads[name].grad is not None, name
            torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4)
        else:
            assert grads[name].grad is None


def test_swin_checkpointing_stages_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"use_checkpoint stages \(0, 4\) must be in \[0, 4\)"):
        _swin(use_checkpoint=(0, 4))


@pytest.mark.parametrize("shifted", [False, True])
def test_swin_window_attention_equals_detectron2s_bit_for_bit(shifted):
    """The attention that takes q, k, v with ``unbind`` gives detectron2's outputs and
    gradients exactly (only the backward's zero-filled intermediates are gone)."""
    from detectron2.modeling.backbone.swin import WindowAttention

    torch.manual_seed(0)
    reference = WindowAttention(32, (7, 7), num_heads=4, qkv_bias=True)
    with torch.no_grad():
        reference.relative_position_bias_table.normal_()
    ours = copy.deepcopy(reference)
    ours.__class__ = swin_module._UnbindWindowAttention
    x = torch.randn(6, 49, 32)
    mask = None
    if shifted:  # 3 windows per image, some pairs masked as in shifted windows
        mask = torch.zeros(3, 49, 49).masked_fill(torch.rand(3, 49, 49) > 0.7, float("-inf"))
        mask.diagonal(dim1=1, dim2=2).zero_()
    results = []
    for module in (reference, ours):
        inputs = x.clone().requires_grad_()
        out = module(inputs, mask=mask)
        out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [p.grad.clone() for p in module.parameters()]
        results.append((out, inputs.grad, grads))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    for reference_grad, our_grad in zip(results[0][2], results[1][2]):
        assert torch.equal(reference_grad, our_grad)


def test_swin_uses_the_unbind_window_attention():
    model = _swin()
    kinds = {type(m) for m in model.modules() if "Attention" in type(m).__name__}
    assert kinds == {swin_module._UnbindWindowAttention}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_swin_mlp_keeps_no_hidden_tensor_and_equals_detectron2s(approximate, monkeypatch):
    """In training the MLP keeps no hidden-size tensor (its hidden layer is computed again in
    the backward, in chunks of rows): detectron2's ``Mlp``'s outputs and gradients to rounding,
    where detectron2's keeps two hidden-size tensors."""
    monkeypatch.setattr(swin_module, "MLP_CHUNK_TOKENS", 16)  # 100 rows: 7 chunks
    from detectron2.modeling.backbone.swin import Mlp

    torch.manual_seed(0)
    reference = Mlp(32, 128, act_layer=lambda: torch.nn.GELU(approximate=approximate)).train()
    ours = copy.deepcopy(reference)
    ours.__class__ = swin_module._RowChunkedMlp
    x = torch.randn(2, 50, 32)
    results = []
    for module in (reference, ours):
        inputs = x.clone().requires_grad_()
        saved = []

        def keep(tensor, saved=saved):
            saved.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = module(inputs)
        out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        hidden = [
            shape for shape in saved if shape[-1] == 128 and len(shape) > 1 and shape[0] != 32
        ]
        results.append((out, inputs.grad, [p.grad for p in module.parameters()], hidden))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    for reference_grad, our_grad in zip(results[0][2], results[1][2]):
        # Sums over chunks of rows: rounding relative to the gradient's largest element.
        scale = max(reference_grad.abs().max().item(), 1.0)
        torch.testing.assert_close(our_grad, reference_grad, atol=1e-6 * scale, rtol=1e-5)
    assert len(results[0][3]) == 2 and len(results[1][3]) == 0


def test_swin_mlp_under_autocast_takes_the_plain_path():
    from detectron2.modeling.backbone.swin import Mlp

    torch.manual_seed(0)
    reference = Mlp(32, 128).train()
    ours = copy.deepcopy(reference)
    ours.__class__ = swin_module._RowChunkedMlp
    x = torch.randn(2, 50, 32)
    with torch.autocast("cpu", torch.bfloat16):
        out, expected = ours(x), reference(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
