"""The converter's image side: official and transformers keys -> ``backbone.*`` / ``neck.*``,
and the lazy config it writes (Swin variant, neck channels, tokenizer). The end-to-end round
trip (CLI, whole model, outputs) is in test_model_parity.py."""

import pytest
import torch
from detectron2.config import instantiate
from torch import nn

from grounding_dino.convert import convert_hf_state_dict, convert_official_state_dict
from grounding_dino.convert.build import _hf_config, _official_config, default_config_path
from grounding_dino.modeling.backbone import InputProjectionNeck, SwinBackbone


def _prefixed(module: nn.Module, prefix: str):
    return {prefix + k: v for k, v in module.state_dict().items()}


def _official_input_proj(in_channels, hidden_dim=256):
    return nn.ModuleList(
        [
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim))
            for c in in_channels
        ]
        + [
            nn.Sequential(
                nn.Conv2d(in_channels[-1], hidden_dim, 3, 2, 1), nn.GroupNorm(32, hidden_dim)
            )
        ]
    )


def _official_rest(num_layers=6, num_queries=900):
    """The non-image keys `_official_config` reads the structure from (small BERT)."""
    state = {
        "transformer.tgt_embed.weight": torch.zeros(num_queries, 256),
        "bert.embeddings.word_embeddings.weight": torch.zeros(30522, 64),
        "bert.embeddings.position_embeddings.weight": torch.zeros(512, 64),
        "bert.embeddings.token_type_embeddings.weight": torch.zeros(2, 64),
        "bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(128, 64),
    }
    for i in range(num_layers):
        state[f"transformer.encoder.layers.{i}.linear1.weight"] = torch.zeros(1)
        state[f"transformer.decoder.layers.{i}.linear1.weight"] = torch.zeros(1)
    return state


@pytest.mark.parametrize(
    "variant, channels", [("swin_T_224_1k", (192, 384, 768)), ("swin_B_384_22k", (256, 512, 1024))]
)
def test_official_image_side_converts_and_config_matches(variant, channels):
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import (
        build_swin_transformer as official_build,
    )

    official_swin = official_build(variant, 384 if "384" in variant else 224, out_indices=(1, 2, 3))
    input_proj = _official_input_proj(channels)
    state = {
        **_prefixed(official_swin, "module.backbone.0."),
        **_prefixed(input_proj, "module.input_proj."),
        "module.bert.encoder.layer.0.output.dense.weight": torch.ones(2),
    }
    converted, ignored = convert_official_state_dict(state)
    assert ignored == []
    assert converted["text_encoder.bert.encoder.layer.0.output.dense.weight"].sum() == 2

    cfg = _official_config(
        {k[len("module.") :]: v for k, v in state.items()} | _official_rest(),
        default_config_path("official", f"groundingdino_{variant}.pth"),
        tokenizer="/some/tokenizer",
    )
    model = cfg.model
    assert model.backbone.variant == variant
    assert list(model.backbone.out_indices) == [1, 2, 3]
    assert tuple(model.neck.in_channels) == channels
    assert model.num_feature_levels == 4
    assert model.prompt_encoder.tokenizer_name_or_path == "/some/tokenizer"
    assert model.text_encoder.bert_config["hidden_size"] == 64

    body = instantiate(model.backbone)
    neck = instantiate(model.neck)
    assert isinstance(body, SwinBackbone) and isinstance(neck, InputProjectionNeck)
    neck.check_backbone(body)
    for prefix, module in (("backbone.", body), ("neck.", neck)):
        expected = module.state_dict()
        got = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
        assert set(got) == set(expected)
        assert all(got[k].shape == expected[k].shape for k in expected)
    # The official relative_position_index buffers are dropped: ours are rebuilt, equal.
    key = "layers.2.blocks.1.attn.relative_position_index"
    assert torch.equal(body.get_buffer(key), official_swin.state_dict()[key])


def _hf_model(**swin_sizes):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoForObjectDetection,
    )

    swin = SwinConfig(out_indices=[2, 3, 4], drop_path_rate=0.0, **swin_sizes)
    text = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=swin, text_config=text, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=4,
        positional_embedding_temperature=10,
    )  # fmt: skip
    torch.manual_seed(0)
    return GroundingDinoForObjectDetection(config).eval()


TINY = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7)


def test_hf_image_side_converts_and_config_matches(tmp_path):
    hf = _hf_model(**TINY)
    hf.config.save_pretrained(tmp_path)
    converted, _ = convert_hf_state_dict(hf.state_dict())
    cfg = _hf_config(str(tmp_path), None, tokenizer="/some/tokenizer")
    model = cfg.model
    assert dict(model.backbone.variant) == TINY
    assert tuple(model.neck.in_channels) == (64, 128, 256)
    assert model.position_embedding.temperature == 10
    assert model.prompt_encoder.tokenizer_name_or_path == "/some/tokenizer"
    body, neck = instantiate(model.backbone).eval(), instantiate(model.neck).eval()
    neck.check_backbone(body)
    body.load_state_dict({k[9:]: v for k, v in converted.items() if k.startswith("backbone.")})
    neck.load_state_dict({k[5:]: v for k, v in converted.items() if k.startswith("neck.")})
    # The converted body + neck compute transformers' projected maps.
    images = torch.randn(1, 3, 64, 96)
    mask = torch.ones(1, 64, 96, dtype=torch.long)
    with torch.no_grad():
        features, _ = hf.model.backbone(images, mask)
        expected = [proj(f) for proj, (f, _) in zip(hf.model.input_proj_vision, features)]
        got = neck(list(body(images).values()))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_hf_config_names_a_known_variant_and_refuses_unsupported_swin(tmp_path):
    from transformers import GroundingDinoConfig, SwinConfig

    swin_t = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
        out_indices=[2, 3, 4],
    )  # fmt: skip
    GroundingDinoConfig(backbone_config=swin_t).save_pretrained(tmp_path)
    cfg = _hf_config(str(tmp_path), None, tokenizer=None)
    assert cfg.model.backbone.variant == "swin_T_224_1k"
    assert tuple(cfg.model.neck.in_channels) == (192, 384, 768)
    assert cfg.model.prompt_encoder.tokenizer_name_or_path == "bert-base-uncased"

    swin_t.use_absolute_embeddings = True
    GroundingDinoConfig(backbone_config=swin_t).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_absolute_embeddings"):
        _hf_config(str(tmp_path), None, tokenizer=None)
