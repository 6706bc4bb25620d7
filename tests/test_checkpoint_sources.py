"""More checkpoint sources: ImageNet Swin (official release, timm), closed-set DINO (official,
detrex), Open-GroundingDino training checkpoints (allow-list unpickling) and mmdetection's
Grounding DINO. The source state dicts are built here from independent weights (timm's Swin) or
from this project's model renamed into each layout, so the tests check where every value lands.
"""

import argparse
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate

from grounding_dino.checkpoint import GroundingDINOCheckpointer
from grounding_dino.convert import detect_source, load_init_checkpoint, load_training_checkpoint
from grounding_dino.convert.__main__ import main as convert_main
from grounding_dino.convert.dino import convert_dino_state_dict
from grounding_dino.model_zoo import get_config
from grounding_dino.modeling.backbone import SwinBackbone
from grounding_dino.text import PromptRun

NUM_DECODER_LAYERS = 2
GROUNDING_ONLY = re.compile(
    r"^text_encoder\.|\.fusion\.|\.text_layer\.|\.ca_text\.|\.catext_norm\.|^(query_selector\.)?head\."
)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05 + 0.01)


def _rename_all(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
    return out


# ---------------------------------------------------------------- ImageNet Swin (timm, official)


@pytest.fixture(scope="module")
def timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # 448 px: every stage is larger than the 7x7 window (classification Swin stops shifting
    # windows on a map no larger than a window, detection Swin does not; the weights are the
    # same for any image size).
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=448)
    model.eval()
    _perturb(model, 1)
    return model


def _backbone_from_partial(path) -> SwinBackbone:
    body = SwinBackbone(
        variant="swin_T_224_1k",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        frozen_stages=-1,
        use_checkpoint=False,
    ).eval()
    _perturb(body, 2)  # the per-stage norms (not covered) get values of their own
    data = torch.load(path, weights_only=True)
    body.load_state_dict({k[len("backbone.") :]: v for k, v in data["model"].items()}, strict=False)
    return body, data


def _assert_equals_timm_stages(body: SwinBackbone, timm_model) -> None:
    image = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = body(image)
        stages = timm_model.forward_intermediates(image, intermediates_only=True)
    for i, stage in enumerate(stages):
        norm = getattr(body, f"norm{i}")
        expected = F.layer_norm(
            stage.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias
        )
        torch.testing.assert_close(ours[f"p{i}"], expected.permute(0, 3, 1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("features_only", [False, True])
def test_timm_swin_gives_timm_stage_features(tmp_path, timm_swin, features_only, capsys):
    state = timm_swin.state_dict()
    if features_only:  # timm's features_only models name the stages layers_<i>
        state = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    torch.save(state, tmp_path / "timm_swin_t.pth")
    code = convert_main(["swin", str(tmp_path / "timm_swin_t.pth"), str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "covers: backbone.layers.*.blocks, backbone.layers.*.downsample, backbone.patch_" in printed
    )
    assert (
        "stays at its initialisation: backbone.norm1, backbone.norm2, backbone.norm3, de" in printed
    )
    if not features_only:
        assert "dropped: head.fc.weight (ImageNet classification head)" in printed
        assert "dropped: norm.weight" in printed
    body, data = _backbone_from_partial(tmp_path / "out" / "model.pth")
    assert data["partial_checkpoint"]["source"] == "imagenet-swin"
    assert "backbone.layers.0.downsample.reduction.weight" in data["model"]
    assert not any(k.startswith("backbone.norm") for k in data["model"])
    _assert_equals_timm_stages(body, timm_swin)


def test_official_swin_release_layout_converts(tmp_path, timm_swin, capsys):
    # The official release layout: patch merging at the end of stages 0..2, head.*, norm.*,
    # relative_position_index and attn_mask buffers (what timm's checkpoint_filter_fn undoes).
    state = {}
    for key, value in timm_swin.state_dict().items():
        key = re.sub(
            r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key
        )
        state[key.replace("head.fc.", "head.")] = value
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    torch.save({"model": state}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    code = convert_main(
        ["auto", str(tmp_path / "swin_tiny_patch4_window7_224.pth"), str(tmp_path / "out")]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dropped: head.weight (ImageNet classification head)" in printed
    assert "dropped: layers.0.blocks.1.attn_mask (buffer rebuilt" in printed
    body, _ = _backbone_from_partial(tmp_path / "out" / "model.pth")
    _assert_equals_timm_stages(body, timm_swin)
    # A second conversion into the same folder never overwrites the file.
    again = ["swin", str(tmp_path / "swin_tiny_patch4_window7_224.pth"), str(tmp_path / "out")]
    assert convert_main(again) == 1
    assert "this command does not write over files: pass --force" in capsys.readouterr().err


# ---------------------------------------------------------------- a Grounding DINO to rename


@pytest.fixture(scope="module")
def ours(tmp_path_factory, minilm_dir):
    """A small Grounding DINO (Swin-T, MiniLM BERT, 1 enhancer / 2 decoder layers, 20 queries)
    with perturbed weights, and its config file."""
    cfg = get_config("grounding_dino_swin_t_ogc.py")
    cfg.model.text_encoder.name_or_path = minilm_dir
    cfg.model.enhancer.num_layers = 1
    cfg.model.decoder.num_layers = NUM_DECODER_LAYERS
    cfg.model.query_selector.num_queries = 20
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    _perturb(model, 4)
    path = tmp_path_factory.mktemp("ours") / "config.yaml"
    LazyConfig.save(cfg, str(path))
    return model, str(path)


def _forward(model):
    image = torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(5))
    caption = "a red car . the man on the left ."
    run = PromptRun(0, caption, model.prompt_encoder.tokenize(caption)["input_ids"])
    with torch.no_grad():
        out = model.forward_transformer([image.float()], [run])
    return out["pred_logits"], out["pred_boxes"]


def _fresh(config_path):
    cfg = LazyConfig.load(config_path)
    torch.manual_seed(123)
    return instantiate(cfg.model).eval()


# ---------------------------------------------------------------- closed-set DINO


def _official_dino_layout(state):
    rules = [
        (r"^backbone\.", "backbone.0."),
        (r"^neck\.projections\.(\d+)\.norm\.", r"input_proj.\1.1."),
        (r"^neck\.projections\.(\d+)\.", r"input_proj.\1.0."),
        (r"^enhancer\.level_embed$", "transformer.level_embed"),
        (r"^enhancer\.layers\.(\d+)\.image_layer\.", r"transformer.encoder.layers.\1."),
        (r"^query_selector\.bbox_embed\.", "transformer.enc_out_bbox_embed."),
        (r"^query_selector\.(enc_output|enc_output_norm|tgt_embed)\.", r"transformer.\1."),
        (
            r"^decoder\.layers\.(\d+)\.(self_attn|norm\d|cross_attn|linear\d)\.",
            r"transformer.decoder.layers.\1.\2.",
        ),
        (r"^decoder\.(norm|ref_point_head)\.", r"transformer.decoder.\1."),
    ]
    out = _rename_all(state, rules)
    for i in range(NUM_DECODER_LAYERS):  # the shared box head, as DINO's state dict lists it
        for key, value in state.items():
            if key.startswith("decoder.bbox_embed."):
                out[key.replace("decoder.bbox_embed.", f"bbox_embed.{i}.")] = value
                out[key.replace("decoder.bbox_embed.", f"transformer.decoder.bbox_embed.{i}.")] = (
                    value
                )
        out[f"class_embed.{i}.weight"] = torch.randn(91, 256)
    out["transformer.enc_out_class_embed.weight"] = torch.randn(91, 256)
    out["label_enc.weight"] = torch.randn(92, 256)
    return out


def _detrex_dino_layout(state):
    rules = [
        (r"^backbone\.", "backbone."),
        (r"^neck\.projections\.3\.norm\.", "neck.extra_convs.0.norm."),
        (r"^neck\.projections\.3\.", "neck.extra_convs.0.conv."),
        (r"^neck\.projections\.(\d+)\.norm\.", r"neck.convs.\1.norm."),
        (r"^neck\.projections\.(\d+)\.", r"neck.convs.\1.conv."),
        (r"^enhancer\.level_embed$", "transformer.level_embeds"),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.self_attn\.",
            r"transformer.encoder.layers.\1.attentions.0.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.linear1\.",
            r"transformer.encoder.layers.\1.ffns.0.layers.0.0.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.linear2\.",
            r"transformer.encoder.layers.\1.ffns.0.layers.1.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.norm1\.",
            r"transformer.encoder.layers.\1.norms.0.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.norm2\.",
            r"transformer.encoder.layers.\1.norms.1.",
        ),
        (
            r"^decoder\.layers\.(\d+)\.self_attn\.",
            r"transformer.decoder.layers.\1.attentions.0.attn.",
        ),
        (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"transformer.decoder.layers.\1.attentions.1."),
        (r"^decoder\.layers\.(\d+)\.norm2\.", r"transformer.decoder.layers.\1.norms.0."),
        (r"^decoder\.layers\.(\d+)\.norm1\.", r"transformer.decoder.layers.\1.norms.1."),
        (r"^decoder\.layers\.(\d+)\.norm3\.", r"transformer.decoder.layers.\1.norms.2."),
        (
            r"^decoder\.layers\.(\d+)\.linear1\.",
            r"transformer.decoder.layers.\1.ffns.0.layers.0.0.",
        ),
        (r"^decoder\.layers\.(\d+)\.linear2\.", r"transformer.decoder.layers.\1.ffns.0.layers.1."),
        (r"^decoder\.(norm|ref_point_head)\.", r"transformer.decoder.\1."),
        (r"^query_selector\.(enc_output|enc_output_norm|tgt_embed)\.", r"transformer.\1."),
        (r"^query_selector\.bbox_embed\.", f"bbox_embed.{NUM_DECODER_LAYERS}."),
        (r"^decoder\.bbox_embed\.", f"bbox_embed.{NUM_DECODER_LAYERS - 1}."),
    ]
    out = _rename_all(state, rules)
    for i in range(NUM_DECODER_LAYERS - 1):  # detrex: one box head per layer (deep copies)
        for key, value in state.items():
            if key.startswith("decoder.bbox_embed."):
                out[key.replace("decoder.bbox_embed.", f"bbox_embed.{i}.")] = value + 1.0
    for key in [k for k in out if k.startswith("bbox_embed.")]:
        out["transformer.decoder." + key] = out[key]
    for i in range(NUM_DECODER_LAYERS + 1):
        out[f"class_embed.{i}.weight"] = torch.randn(80, 256)
    out["label_enc.weight"] = torch.randn(80, 256)
    out["backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49)
    out["transformer.encoder.post_norm_layer.weight"] = torch.ones(256)
    return out


@pytest.mark.parametrize("layout", ["dino-official", "dino-detrex"])
def test_dino_shared_parts_land_in_place(ours, layout, tmp_path, capsys):
    model, config_path = ours
    state = model.state_dict()
    source = (_official_dino_layout if layout == "dino-official" else _detrex_dino_layout)(state)
    assert detect_source(source) == layout
    converted, dropped, notes = convert_dino_state_dict(source, layout)
    shared = {k for k in state if not GROUNDING_ONLY.search(k)}
    assert shared <= set(converted)
    for key in shared:
        assert torch.equal(converted[key], state[key]), key
    assert "label_enc.weight" in dropped and "class_embed.0.weight" in dropped
    assert any("different box heads" in n for n in notes) == (layout == "dino-detrex")

    # Through the CLI (an Open-DINO style training checkpoint: weights + args), then loaded.
    checkpoint = {"model": source, "epoch": 11, "args": argparse.Namespace(lr=1e-4)}
    torch.save(checkpoint, tmp_path / "dino.pth")
    out_dir = tmp_path / "out"
    assert (
        convert_main([layout, str(tmp_path / "dino.pth"), str(out_dir), "--config", config_path])
        == 0
    )
    printed = capsys.readouterr().out
    assert "enhancer.layers.*.fusion" in printed and "decoder.layers.*.ca_text" in printed
    assert "not converted: top-level entry 'args'" in printed
    fresh = _fresh(config_path)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_init_checkpoint(str(out_dir / "model.pth"), fresh)
    assert report["partial"] and report["source"] == layout
    assert "decoder.layers.*.catext_norm" in report["not_covered"]
    for key, value in fresh.state_dict().items():
        expected = state[key] if key in shared else before[key]
        assert torch.equal(value, expected), key
    # The unconverted file loads directly too (train.init_checkpoint may name it).
    direct = _fresh(config_path)
    report = load_init_checkpoint(str(tmp_path / "dino.pth"), direct)
    assert report["source"] == layout and report["skipped_entries"] == ["args", "epoch"]
    if layout == "dino-detrex":
        assert report["unused"] == ["transformer.encoder.post_norm_layer.weight"]
    assert all(torch.equal(direct.state_dict()[k], state[k]) for k in shared)


def test_training_init_reads_an_unconverted_dino_checkpoint(ours, tmp_path):
    """train_net's initialisation (GroundingDINOCheckpointer with convert_sources) takes an
    unconverted DINO training checkpoint: refused without train.init_partial, loaded with it."""
    from grounding_dino.checkpoint import CheckpointMismatchError

    model, config_path = ours
    state = model.state_dict()
    path = tmp_path / "dino.pth"
    torch.save({"model": _official_dino_layout(state), "args": argparse.Namespace()}, path)
    fresh = _fresh(config_path)
    checkpointer = GroundingDINOCheckpointer(fresh, str(tmp_path / "run"))
    with pytest.raises(CheckpointMismatchError, match="train.init_partial"):
        checkpointer.resume_or_load(str(path), resume=False, convert_sources=True)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    checkpointer = GroundingDINOCheckpointer(fresh, str(tmp_path / "run"))  # a failed load ends it
    checkpointer.resume_or_load(str(path), resume=False, partial=True, convert_sources=True)
    shared = {k for k in state if not GROUNDING_ONLY.search(k)}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key] if key in shared else before[key]), key
    # Without convert_sources (--eval-only, the predictor) the same file is not read.
    with pytest.raises(ValueError, match="dino.pth"):
        GroundingDINOCheckpointer(_fresh(config_path)).load(str(path))


# ---------------------------------------------------------------- mmdetection, Open-GroundingDino


def _to_unfold_order(x):
    """mmdet's correct_unfold_{reduction,norm}_order (official -> mmdet), as its converter."""
    if x.dim() == 2:
        out_channels, in_channels = x.shape
        x = x.reshape(out_channels, 4, in_channels // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channels, in_channels)
    x = x.reshape(4, x.shape[0] // 4)
    return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(-1)


def _mmdet_layout(state):
    L = NUM_DECODER_LAYERS
    rules = [
        (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (
            r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.",
            r"backbone.stages.\1.blocks.\2.attn.w_msa.",
        ),
        (
            r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.",
            r"backbone.stages.\1.blocks.\2.ffn.layers.0.0.",
        ),
        (
            r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.",
            r"backbone.stages.\1.blocks.\2.ffn.layers.1.",
        ),
        (r"^backbone\.layers\.", "backbone.stages."),
        (r"^backbone\.", "backbone."),
        (r"^neck\.projections\.3\.norm\.", "neck.extra_convs.0.gn."),
        (r"^neck\.projections\.3\.", "neck.extra_convs.0.conv."),
        (r"^neck\.projections\.(\d+)\.norm\.", r"neck.convs.\1.gn."),
        (r"^neck\.projections\.(\d+)\.", r"neck.convs.\1.conv."),
        (r"^text_encoder\.bert\.", "language_model.language_backbone.body.model."),
        (r"^text_encoder\.feat_map\.", "text_feat_map."),
        (r"^enhancer\.level_embed$", "level_embed"),
        (r"^enhancer\.layers\.(\d+)\.fusion\.", r"encoder.fusion_layers.\1."),
        (r"^enhancer\.layers\.(\d+)\.image_layer\.self_attn\.", r"encoder.layers.\1.self_attn."),
        (
            r"^enhancer\.layers\.(\d+)\.text_layer\.self_attn\.",
            r"encoder.text_layers.\1.self_attn.attn.",
        ),
        (r"^enhancer\.layers\.(\d+)\.image_layer\.linear1\.", r"encoder.layers.\1.ffn.layers.0.0."),
        (r"^enhancer\.layers\.(\d+)\.image_layer\.linear2\.", r"encoder.layers.\1.ffn.layers.1."),
        (
            r"^enhancer\.layers\.(\d+)\.image_layer\.norm(\d)\.",
            lambda m: f"encoder.layers.{m.group(1)}.norms.{int(m.group(2)) - 1}.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.text_layer\.linear1\.",
            r"encoder.text_layers.\1.ffn.layers.0.0.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.text_layer\.linear2\.",
            r"encoder.text_layers.\1.ffn.layers.1.",
        ),
        (
            r"^enhancer\.layers\.(\d+)\.text_layer\.norm(\d)\.",
            lambda m: f"encoder.text_layers.{m.group(1)}.norms.{int(m.group(2)) - 1}.",
        ),
        (r"^query_selector\.enc_output\.", "memory_trans_fc."),
        (r"^query_selector\.enc_output_norm\.", "memory_trans_norm."),
        (r"^query_selector\.tgt_embed\.", "query_embedding."),
        (
            r"^query_selector\.bbox_embed\.layers\.(\d)\.",
            lambda m: f"bbox_head.reg_branches.{L}.{2 * int(m.group(1))}.",
        ),
        (r"^decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn.attn."),
        (r"^decoder\.layers\.(\d+)\.ca_text\.", r"decoder.layers.\1.cross_attn_text.attn."),
        (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.cross_attn."),
        (r"^decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.norms.0."),
        (r"^decoder\.layers\.(\d+)\.catext_norm\.", r"decoder.layers.\1.norms.1."),
        (r"^decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.norms.2."),
        (r"^decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.norms.3."),
        (r"^decoder\.layers\.(\d+)\.linear1\.", r"decoder.layers.\1.ffn.layers.0.0."),
        (r"^decoder\.layers\.(\d+)\.linear2\.", r"decoder.layers.\1.ffn.layers.1."),
        (r"^decoder\.(norm|ref_point_head)\.", r"decoder.\1."),
    ]
    out = _rename_all(state, rules)
    for key in [k for k in out if re.search(r"\.downsample\.(reduction|norm)\.", k)]:
        out[key] = _to_unfold_order(out[key])
    for i in range(L):
        for key, value in state.items():
            if match := re.match(r"^decoder\.bbox_embed\.layers\.(\d)\.(\w+)$", key):
                out[f"bbox_head.reg_branches.{i}.{2 * int(match.group(1))}.{match.group(2)}"] = (
                    value
                )
    for i in range(L + 1):  # mmdet's log_scale=0.0 head: logits * exp(0)
        out[f"bbox_head.cls_branches.{i}.log_scale"] = torch.zeros(1)
    out["dn_query_generator.label_embedding.weight"] = torch.randn(256, 256)
    return out


def test_mmdet_checkpoint_converts_to_equal_outputs(
    ours, tmp_path, minilm_dir, capsys, load_converted
):
    model, _ = ours
    state = model.state_dict()
    mmdet_state = _mmdet_layout(state)
    assert len(mmdet_state) == len(state) + (NUM_DECODER_LAYERS - 1) * 6 + NUM_DECODER_LAYERS + 2
    assert detect_source(mmdet_state) == "mmdet"
    path = tmp_path / "grounding_dino_swin-t_mmdet.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mmdet_state}, path)
    out_dir = tmp_path / "out"
    assert convert_main(["mmdet", str(path), str(out_dir), "--tokenizer", minilm_dir]) == 0
    printed = capsys.readouterr().out
    assert "missing keys: 0, unexpected keys: 0" in printed
    assert "dropped: dn_query_generator.label_embedding.weight" in printed
    converted = load_converted(out_dir)  # model_zoo.get: the converted config and weights
    loaded = converted.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # mmdet's exp(0) scale is ours exp(0.5 ln 256) / sqrt(256).
    assert math.isclose(loaded["head.log_scale"].item(), 0.5 * math.log(256), rel_tol=1e-6)
    for got, expected in zip(_forward(converted), _forward(model)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _official_layout(state):
    """Ours -> the official layout, through mmdet's (the official code's names)."""
    from grounding_dino.convert.mmdet import mmdet_to_official_state_dict

    official, _, _, _ = mmdet_to_official_state_dict(_mmdet_layout(state))
    official["bert.pooler.dense.weight"] = torch.randn(384, 384)  # in the official files
    return official


def test_open_groundingdino_training_checkpoint_converts(ours, tmp_path, minilm_dir, capsys):
    model, _ = ours
    state = model.state_dict()
    weights = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(weights.parameters())
    weights(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [11])  # a Counter inside
    args = argparse.Namespace(modelname="groundingdino", lr=1e-4, lr_drop_list=[11], use_ema=False)
    path = tmp_path / "checkpoint0011.pth"
    torch.save(
        {
            "model": _official_layout(state),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 11,
            "args": args,
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only loading refuses it
        torch.load(path, weights_only=True)
    assert load_training_checkpoint(str(path))["args"] == args
    code = convert_main(
        ["open-groundingdino", str(path), str(tmp_path / "out"), "--tokenizer", minilm_dir]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "missing keys: 0, unexpected keys: 0" in printed
    assert "not converted: top-level entry 'optimizer'" in printed
    converted = torch.load(tmp_path / "out" / "model.pth", weights_only=True)["model"]
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_training_checkpoint_running_code_is_refused(tmp_path, ours, capsys):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pth: refused to load 'posix\.system'"):
        load_training_checkpoint(str(path))
    assert convert_main(["open-groundingdino", str(path), str(tmp_path / "out")]) == 1
    assert "refused to load 'posix.system'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="posix.system"):
        load_init_checkpoint(str(path), ours[0])
    assert not marker.exists()


def test_torchvision_resnet_keys_map_onto_detectron2_resnet():
    # The official DINO's R-50 body is torchvision's (IntermediateLayerGetter: no fc).
    import torchvision

    from grounding_dino.convert.dino import convert_torchvision_resnet_state_dict
    from grounding_dino.modeling.backbone import ResNetBackbone

    state = torchvision.models.resnet50().state_dict()
    converted = convert_torchvision_resnet_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}
    )
    body = ResNetBackbone(
        depth=50, out_features=("res3", "res4", "res5"), norm="FrozenBN", freeze_at=0
    )
    expected = body.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert torch.equal(
        converted["res5.2.conv3.norm.running_var"], state["layer4.2.bn3.running_var"]
    )
