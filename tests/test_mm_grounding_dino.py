"""MM-Grounding-DINO and LLMDet (one class and box head per decoder layer): transformers'
``MMGroundingDinoForObjectDetection`` folders and mmdetection-layout checkpoints convert with the
CLI and give the same outputs, in PyTorch and through the ONNX export.

The helpers of the shared-head parity tests (tests/test_model_parity.py,
tests/test_onnx_export.py, tests/test_checkpoint_sources.py) are reused, at their tolerances.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from hf_reference import convert_hf_folder, perturbed_hf_model
from test_checkpoint_sources import NUM_DECODER_LAYERS, _forward, _mmdet_layout, _perturb
from test_model_parity import _assert_close, _hf_forward, _ours_forward
from test_onnx_export import CAPTIONS, SIZES, _assert_same_detections, _export_cli
from test_onnx_export import assert_graph_matches_model
from test_train_net import batch as train_batch
from torch import nn

from grounding_dino.convert.__main__ import main as convert_main
from grounding_dino.convert.sources import detect_source
from grounding_dino.deploy import OnnxPredictor
from grounding_dino.model_zoo import get_config
from grounding_dino.modeling.head import ContrastiveHead, layer_heads, layer_logits
from grounding_dino.predictor import GroundingDINOPredictor
from grounding_dino.resize import OfficialResize
from grounding_dino.text import normalize_caption
from grounding_dino.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def mm_pair(tmp_path_factory, minilm_dir, load_converted):
    """A small random ``MMGroundingDinoForObjectDetection`` (every parameter perturbed), saved
    and converted with the CLI: (hf model, our model, tokenizer, CLI stdout, output folder,
    transformers folder)."""
    folder = tmp_path_factory.mktemp("hf_mm_tiny")
    hf = perturbed_hf_model(seed=7, model_type="mm-grounding-dino")
    hf.save_pretrained(folder)
    out_dir = tmp_path_factory.mktemp("converted_mm_tiny")
    stdout = convert_hf_folder(folder, out_dir, minilm_dir)
    return hf, load_converted(out_dir), load_tokenizer(minilm_dir), stdout, out_dir, folder


def test_mm_folder_converts_with_per_layer_heads(mm_pair):
    hf, model, _, stdout, *_ = mm_pair
    assert "missing keys: 0, unexpected keys: 0" in stdout
    assert isinstance(model.head, nn.ModuleList) and len(model.head) == 2
    assert isinstance(model.decoder.bbox_embed, nn.ModuleList)
    # The per-layer heads are all different (so a shared head could not pass the parity tests).
    biases = [float(h.bias) for h in model.head] + [float(model.query_selector.head.bias)]
    assert len(set(biases)) == 3
    first, second = (box.layers[0].weight for box in model.decoder.bbox_embed)
    assert not torch.equal(first, second)
    assert [float(h.bias) for h in model.head] == [float(h.bias) for h in hf.class_embed]
    # The 1/sqrt(C) scale is a constant, not a parameter (fine-tuning moves only the bias).
    assert all(h.fixed_scale and h.log_scale is None for h in model.head)


@pytest.mark.parametrize(
    "captions",
    [
        ["a cat . a remote control ."],
        ["what is on the table ? a cup . . ."],
        # A batch of two equal-size images with different captions (padded text).
        ["a cat . a dog .", "is there a person ? the man on the left . . a red car ."],
    ],
)
def test_matches_transformers_mm_grounding_dino(mm_pair, captions):
    hf, model, tokenizer, *_ = mm_pair
    captions = [normalize_caption(c) for c in captions]
    torch.manual_seed(len(captions[0]))
    images = torch.randn(len(captions), 3, 96, 128)
    scores, boxes, length = _hf_forward(hf, tokenizer, images, captions)
    _assert_close(_ours_forward(model, images, captions), (scores, boxes), length, (96, 128))


def test_auto_source_and_bad_model_type(mm_pair, tmp_path, capsys, minilm_dir):
    *_, hf_folder = mm_pair
    out = tmp_path / "auto"
    assert convert_main(["auto", str(hf_folder), str(out), "--tokenizer", minilm_dir]) == 0
    assert "missing keys: 0, unexpected keys: 0" in capsys.readouterr().out
    assert "per_layer_box_heads: true" in (out / "config.yaml").read_text()
    folder = tmp_path / "not_gdino"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "owlv2"}))
    assert convert_main(["hf", str(folder), str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and "model_type='owlv2'" in err
    assert "'mm-grounding-dino'" in err


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def mm_exported(mm_pair, tmp_path_factory):
    """The converted MM model, exported once by the CLI as a user would."""
    _, model, _, _, out_dir, _ = mm_pair
    path = tmp_path_factory.mktemp("mm_onnx") / "model.onnx"
    result = _export_cli(out_dir / "config.yaml", path)
    assert result.returncode == 0, result.stdout + result.stderr
    return path, out_dir / "config.yaml", model


@pytest.mark.slow
def test_onnx_graph_equals_the_mm_model(mm_exported):
    path, config, model = mm_exported
    predictor = OnnxPredictor(str(path), str(config), threads=1)
    worst = assert_graph_matches_model(predictor.session, model, SIZES, CAPTIONS)
    print(f"MM-Grounding-DINO: max score diff {worst[0]:.2e}, max box diff {worst[1]:.2e} px")


@pytest.mark.slow
def test_onnx_predictor_equals_the_torch_predictor_on_the_mm_model(mm_exported):
    path, config, _ = mm_exported
    knobs = ["model.box_threshold=0.0"]  # random weights: keep every query
    onnx_predictor = OnnxPredictor(str(path), str(config), overrides=knobs, threads=1)
    torch_predictor = GroundingDINOPredictor.from_config_file(str(config), overrides=knobs)
    for predictor in (onnx_predictor, torch_predictor):
        predictor.resize = OfficialResize(160, 320)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in [(150, 230, 3), (90, 120, 3)]]
    prompts = [CAPTIONS[1], ["cat", "remote control", "person on the left"]]
    for ours, theirs in zip(
        onnx_predictor.predict_batch(images, prompts),
        torch_predictor.predict_batch(images, prompts),
    ):
        _assert_same_detections(ours, theirs)


# ---------------------------------------------------------------- mmdetection layout, LLMDet


@pytest.fixture(scope="module")
def ours_mm(minilm_dir):
    """Our MM-Grounding-DINO (Swin-T: the mmdet converter knows the published bodies; MiniLM
    BERT, 1 enhancer / 2 decoder layers) with every parameter perturbed: per-layer heads all
    different."""
    cfg = get_config("mm_grounding_dino_swin_t.py")
    cfg.model.text_encoder.name_or_path = minilm_dir
    cfg.model.enhancer.num_layers = 1
    cfg.model.decoder.num_layers = NUM_DECODER_LAYERS
    cfg.model.query_selector.num_queries = 20
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    _perturb(model, 5)
    return model


def _mmdet_mm_layout(state):
    """Ours -> mmdet's MM-Grounding-DINO keys: the shared-head layout of
    test_checkpoint_sources with per-layer ``reg_branches.<i>`` / ``cls_branches.<i>.bias``
    (shape [1], mmdet's ``log_scale='auto', bias=True`` head: no log_scale parameter)."""
    out = {k: v for k, v in _mmdet_layout(state).items() if not k.endswith(".log_scale")}
    for key, value in state.items():
        if match := re.match(r"^decoder\.bbox_embed\.(\d)\.layers\.(\d)\.(\w+)$", key):
            layer, linear, name = match.groups()
            out[f"bbox_head.reg_branches.{layer}.{2 * int(linear)}.{name}"] = value
        elif match := re.match(r"^head\.(\d)\.bias$", key):
            out[f"bbox_head.cls_branches.{match.group(1)}.bias"] = value.reshape(1)
    out[f"bbox_head.cls_branches.{NUM_DECODER_LAYERS}.bias"] = state[
        "query_selector.head.bias"
    ].reshape(1)
    return out


def test_mmdet_mm_checkpoint_converts_to_identical_outputs(
    ours_mm, tmp_path, minilm_dir, capsys, load_converted
):
    state = ours_mm.state_dict()
    mmdet_state = _mmdet_mm_layout(state)
    path = tmp_path / "grounding_dino_swin-t_pretrain_obj365_goldg_grit9m_v3det.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mmdet_state}, path)
    assert convert_main(["mmdet", str(path), str(tmp_path / "out"), "--tokenizer", minilm_dir]) == 0
    printed = capsys.readouterr().out
    assert "missing keys: 0, unexpected keys: 0" in printed
    assert "constant 1/sqrt(256)" in printed
    converted = load_converted(tmp_path / "out")
    loaded = converted.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    for got, expected in zip(_forward(converted), _forward(ours_mm)):
        assert torch.equal(got, expected)


def test_llmdet_checkpoint_drops_and_names_its_language_model_branch(
    ours_mm, tmp_path, minilm_dir, capsys, load_converted
):
    mmdet_state = _mmdet_mm_layout(ours_mm.state_dict())
    llm_branch = {
        **{
            f"lmm.model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.randn(4, 8)
            for i in range(12)
        },
        "connector.layers.0.weight": torch.randn(8, 256),
        "region_connector.layers.0.weight": torch.randn(8, 256),
        "image_seperate.weight": torch.randn(1, 8),
        "ref_point_head.layers.0.weight": torch.randn(256, 512),
    }
    state = {**mmdet_state, **llm_branch}
    assert detect_source(state) == "mmdet"
    path = tmp_path / "llmdet_swin_tiny.pth"
    torch.save({"state_dict": state}, path)
    assert convert_main(["auto", str(path), str(tmp_path / "out"), "--tokenizer", minilm_dir]) == 0
    printed = capsys.readouterr().out
    assert "missing keys: 0, unexpected keys: 0" in printed
    # One line for the whole branch (LLMDet's real files hold thousands of its keys).
    prefixes = "connector.*, image_seperate.*, lmm.*, ref_point_head.*, region_connector.*"
    assert f"dropped: 16 keys under {prefixes} (LLMDet's language-model branch" in printed
    converted = load_converted(tmp_path / "out")
    for got, expected in zip(_forward(converted), _forward(ours_mm)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["mm_grounding_dino_swin_b.py", "llmdet_swin_l.py"])
def test_packaged_mm_configs_have_per_layer_heads_and_their_bodies(name):
    cfg = get_config(name)
    assert cfg.model.decoder.per_layer_box_heads is True
    assert cfg.model.head.head.fixed_scale is True and cfg.model.head.head.log_scale_init is None
    assert cfg.model.query_selector.head.fixed_scale is True
    assert cfg.model.text_encoder.name_or_path == "bert-base-uncased"
    if "swin_l" in name:  # mmdet's Swin-L: all four stages and 5 feature levels
        assert cfg.model.backbone.variant == "swin_L_384_22k"
        assert tuple(cfg.model.backbone.out_indices) == (0, 1, 2, 3)
        assert cfg.model.num_feature_levels == 5
    else:
        assert cfg.model.backbone.variant == "swin_B_384_22k"
        assert cfg.model.num_feature_levels == 4


def test_per_layer_head_options_refuse_what_they_cannot_mean():
    with pytest.raises(ValueError, match="fixed_scale=True .* excludes a learned log scale"):
        ContrastiveHead(max_text_len=8, bias_init=0.0, log_scale_init=0.0, fixed_scale=True)
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        layer_heads(ContrastiveHead(max_text_len=8, bias_init=0.0, log_scale_init=None), 0)
    heads = layer_heads(
        ContrastiveHead(max_text_len=8, bias_init=-4.6, log_scale_init=None, fixed_scale=True), 3
    )
    assert len({id(h.bias) for h in heads}) == 3  # independent copies, not one shared head
    hidden = [torch.randn(1, 2, 16) for _ in range(2)]
    text, mask = torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="3 per-layer contrastive heads for 2 decoder layers"):
        layer_logits(heads, hidden, text, mask)
    # The constant scale: exactly transformers' MM head (dot / sqrt(C) + bias).
    logits = layer_logits(heads, hidden + hidden[:1], text, mask)
    expected = hidden[0] @ text.transpose(-1, -2) / 4.0 - 4.6
    torch.testing.assert_close(logits[0, ..., :4], expected)


def test_one_training_step_reaches_every_per_layer_head(mm_pair):
    """Fine-tuning moves each layer's own heads (and only the bias of the contrastive ones:
    the 1/sqrt(C) scale is a constant, so the model still maps onto transformers')."""
    *_, out_dir, _ = mm_pair
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(out_dir / "config.yaml")).model).train()
    # The converted (perturbed) weights: a fresh box head's zero last layer would stop the
    # gradient to its first layers.
    model.load_state_dict(torch.load(out_dir / "model.pth", weights_only=True)["model"])
    with EventStorage():
        losses = model(train_batch(model.tokenizer))
    sum(losses.values()).backward()
    heads = {
        n: p for n, p in model.named_parameters() if re.match(r"^(query_selector\.)?head\.", n)
    }
    assert sorted(heads) == ["head.0.bias", "head.1.bias", "query_selector.head.bias"]
    boxes = [n for n, _ in model.named_parameters() if n.startswith("decoder.bbox_embed.")]
    assert {n.split(".")[2] for n in boxes} == {"0", "1"}
    for name, parameter in model.named_parameters():
        if name in heads or name in boxes:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
