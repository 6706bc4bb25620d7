"""Parity of the Swin backbone, position embedding and input projections with the official
Grounding DINO code and with transformers, plus batch invariance of ``forward_images``."""

import pytest
import torch
from torch import nn

from grounding_dino.modeling.backbone.image_backbone import (
    SwinImageBackbone,
    convert_hf_image_backbone_state_dict,
    convert_official_input_proj_state_dict,
)
from grounding_dino.modeling.backbone.position_encoding import PositionEmbeddingSineHW
from grounding_dino.modeling.backbone.swin import (
    SWIN_VARIANTS,
    SwinTransformer,
    build_swin_transformer,
    convert_hf_swin_state_dict,
    convert_official_swin_state_dict,
)
from grounding_dino.modeling.registry import IMAGE_BACKBONE_REGISTRY

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


def _official_swin():
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import (
        SwinTransformer as OfficialSwin,
    )

    ref = OfficialSwin(
        pretrain_img_size=224,
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
    )
    ref.eval()  # the official train() returns None
    return _perturb(ref)


@pytest.mark.parametrize("size", [(100, 130), (61, 37)])
def test_swin_matches_official(size):
    ref = _official_swin()
    ours = SwinTransformer(**TINY, drop_path_rate=0.0).eval()
    ours.load_state_dict(convert_official_swin_state_dict(ref.state_dict()), strict=True)
    x = _images(2, 3, *size)
    with torch.no_grad():
        expected = ref.forward_raw(x)
        got = ours(x)
    assert len(got) == 3
    for e, g in zip(expected, got):
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
    ours = SwinTransformer(**TINY, drop_path_rate=0.0).eval()
    ours.load_state_dict(convert_hf_swin_state_dict(hf.state_dict()), strict=True)
    x = _images(2, 3, 100, 130)
    with torch.no_grad():
        expected = hf(x).feature_maps
        got = ours(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _tiny_image_backbone():
    swin = SwinTransformer(**TINY, drop_path_rate=0.0)
    return SwinImageBackbone(swin, hidden_dim=64, num_feature_levels=4).eval()


def test_image_backbone_matches_transformers_padded_batch():
    hf = _hf_tiny_grounding_dino()
    ours = _tiny_image_backbone()
    hf_sd = {f"model.{k}": v for k, v in hf.state_dict().items()}
    ours.load_state_dict(convert_hf_image_backbone_state_dict(hf_sd), strict=True)
    images = _images(2, 3, 100, 130)
    pixel_mask = torch.ones(2, 100, 130, dtype=torch.bool)
    pixel_mask[1, 70:] = False
    pixel_mask[1, :, 90:] = False
    images[1][:, ~pixel_mask[1]] = 0
    with torch.no_grad():
        expected = _hf_image_features(hf, images, pixel_mask.long())
        got = ours(images, pixel_mask)
    for exp_list, got_list in zip(expected, got):
        assert len(got_list) == 4
        for e, g in zip(exp_list, got_list):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e.to(g.dtype), atol=ATOL, rtol=0)
    assert [tuple(f.shape[-2:]) for f in got[0]] == [(13, 17), (7, 9), (4, 5), (2, 3)]


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
    ours = PositionEmbeddingSineHW(128, 20, 20, normalize=True)(valid)
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
    alone = PositionEmbeddingSineHW()(torch.ones(1, 6, 4, dtype=torch.bool))
    torch.testing.assert_close(ours[1:, :, :6, :4], alone, atol=1e-6, rtol=0)


def test_image_backbone_official_input_proj_layout():
    """Official ``input_proj.<l>.{0,1}`` Sequentials map onto ours and compute the same."""
    ours = _perturb(_tiny_image_backbone())
    official = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(c, 64, 1), nn.GroupNorm(32, 64)) for c in (64, 128, 256)]
        + [nn.Sequential(nn.Conv2d(256, 64, 3, 2, 1), nn.GroupNorm(32, 64))]
    )
    _perturb(official, seed=3)
    ours.input_proj.load_state_dict(
        convert_official_input_proj_state_dict(official.state_dict()), strict=True
    )
    x = _images(1, 256, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours.input_proj[2](x), official[2](x), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.input_proj[3](x), official[3](x), atol=ATOL, rtol=0)


def test_forward_images_is_batch_invariant():
    model = _perturb(_tiny_image_backbone())
    # ``small`` is taller and narrower than ``large``: every level pads in both directions.
    # ``same`` has the size of ``small``, so the two run as one group.
    small, large = _images(3, 130, 75, seed=2), _images(3, 100, 130, seed=3)
    same = _images(3, 130, 75, seed=4)
    with torch.no_grad():
        feats, masks, pos = model.forward_images([small, large, same])
        for i, image in enumerate([small, large, same]):
            f1, m1, p1 = model.forward_images([image])
            for level in range(4):
                h, w = f1[level].shape[-2:]
                assert m1[level].all()
                assert masks[level][i].sum() == h * w
                assert masks[level][i, :h, :w].all()
                torch.testing.assert_close(
                    feats[level][i, :, :h, :w], f1[level][0], atol=ATOL, rtol=0
                )
                torch.testing.assert_close(
                    pos[level][i, :, :h, :w], p1[level][0], atol=ATOL, rtol=0
                )
                assert feats[level][i, :, h:].abs().sum() == 0
        # The padded batch of the reference way differs (this is why forward_images exists).
        padded = torch.zeros(2, 3, 130, 130)
        padded[0, :, :, :75] = small
        padded[1, :, :100] = large
        ref_feats, _, _ = model(padded)
        assert (ref_feats[0][0, :, :17, :10] - feats[0][0, :, :17, :10]).abs().max() > 1e-3


def test_variants_registry_and_errors():
    assert SWIN_VARIANTS["swin_T_224_1k"] == (96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    assert SWIN_VARIANTS["swin_B_384_22k"] == (128, (2, 2, 18, 2), (4, 8, 16, 32), 12)
    assert SWIN_VARIANTS["swin_L"] == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    assert IMAGE_BACKBONE_REGISTRY.get("SwinImageBackbone") is SwinImageBackbone
    assert build_swin_transformer("swin_T_224_1k").out_channels == [192, 384, 768]
    with pytest.raises(KeyError, match="swin_X"):
        build_swin_transformer("swin_X")
    with pytest.raises(ValueError, match="hidden_dim"):
        SwinImageBackbone(SwinTransformer(**TINY), hidden_dim=48)
    with pytest.raises(ValueError, match="pixel_mask"):
        _tiny_image_backbone()(torch.zeros(1, 3, 32, 32), torch.ones(1, 16, 16, dtype=torch.bool))


def test_official_swin_t_keys_convert():
    """Every key of the official Swin-T backbone maps onto our Swin-T and back in shape."""
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import (
        build_swin_transformer as official_build,
    )

    ref = official_build("swin_T_224_1k", 224, out_indices=(1, 2, 3))
    ours = build_swin_transformer("swin_T_224_1k")
    converted = convert_official_swin_state_dict(ref.state_dict())
    ours_sd = ours.state_dict()
    assert set(converted) == set(ours_sd)
    assert all(converted[k].shape == ours_sd[k].shape for k in ours_sd)
