"""``python -m grounding_dino.convert to-hf``: a model fine-tuned here goes back to a
transformers folder that ``AutoModelForZeroShotObjectDetection`` / ``AutoProcessor`` load
offline, with equal outputs; what transformers cannot hold is refused by name."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from test_train_net import batch

from grounding_dino.text import PromptRun, normalize_caption

TOKEN_TOL = 1e-4
BOX_TOL_PX = 0.05


def _to_hf_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "grounding_dino.convert", "to-hf", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )


def _converted(model_type, converted_tiny, tmp_path_factory, minilm_dir):
    """(transformers model, folder with config.yaml + model.pth) of a small random model of
    ``model_type``, converted with ``convert hf``."""
    if model_type == "grounding-dino":
        hf, out_dir, _ = converted_tiny
        return hf, out_dir
    from hf_reference import perturbed_hf_model

    from grounding_dino.convert.build import convert_checkpoint

    hf = perturbed_hf_model(model_type=model_type)
    folder = tmp_path_factory.mktemp("hf_mm")
    hf.save_pretrained(folder)
    out_dir = tmp_path_factory.mktemp("converted_mm")
    report = convert_checkpoint("hf", str(folder), str(out_dir), tokenizer=minilm_dir)
    assert not report["missing"] and not report["unexpected"]
    return hf, out_dir


@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def fine_tuned(request, converted_tiny, tmp_path_factory, minilm_dir):
    """A converted small Swin + BERT model (shared heads, or MM-Grounding-DINO's per-layer
    heads) after 3 steps of the project's trainer, saved as a Detectron2 checkpoint. Returns
    (model type, model in eval mode, config.yaml, weights path, the transformers model it
    started from)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from grounding_dino import model_zoo
    from grounding_dino.engine import GroundingTrainer, get_param_groups

    model_type = request.param
    hf_start, out_dir = _converted(model_type, converted_tiny, tmp_path_factory, minilm_dir)
    config = out_dir / "config.yaml"
    torch.manual_seed(0)
    model = model_zoo.get(str(config), device="cpu").train()
    groups = get_param_groups(
        model,
        base_lr=1e-3,
        weight_decay=1e-4,
        backbone_lr_multiplier=0.1,
        text_encoder_lr_multiplier=0.1,
    )
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    data = itertools.repeat(batch(model.tokenizer, torch.Generator().manual_seed(0)))
    trainer = GroundingTrainer(
        model, data, optimizer, clip_grad={"enabled": True, "max_norm": 0.1, "norm_type": 2.0}
    )
    with EventStorage(0):
        trainer.train(0, 3)
    folder = tmp_path_factory.mktemp("fine_tuned")
    DetectionCheckpointer(model, str(folder)).save("model_final")
    return model_type, model.eval(), config, folder / "model_final.pth", hf_start


def test_fine_tuned_model_loads_in_transformers_with_equal_outputs(fine_tuned, tmp_path, capsys):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from grounding_dino.convert.to_hf import main as to_hf_main

    model_type, model, config, weights, hf_start = fine_tuned
    out = tmp_path / "hf"
    if model_type == "grounding-dino":  # as a user runs it
        result = _to_hf_cli(config, weights, out)
        assert result.returncode == 0, result.stderr
        assert f"({model_type})" in result.stdout
    else:  # the same command in this process (saves a second start of Python and torch)
        assert to_hf_main([str(config), str(weights), str(out)]) == 0
        assert f"({model_type})" in capsys.readouterr().out
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.txt"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging folder left

    hf = AutoModelForZeroShotObjectDetection.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(hf) is type(hf_start)  # GroundingDino- or MMGroundingDinoForObjectDetection
    assert hf.config.model_type == model_type
    # The fine-tuning moved the weights: the export is not the model the test started from.
    moved = (hf.model.enc_output.weight - hf_start.model.enc_output.weight).abs().max()
    assert moved > 1e-4

    captions = [normalize_caption(c) for c in ("a cat . a remote control .", "red square .")]
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    encoded = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        theirs = hf(
            pixel_values=images,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            token_type_ids=encoded["token_type_ids"],
            pixel_mask=torch.ones(2, 96, 128, dtype=torch.long),
        )
        runs = [
            PromptRun(i, c, model.prompt_encoder.tokenize(c)["input_ids"])
            for i, c in enumerate(captions)
        ]
        ours = model.forward_transformer(list(images), runs)
    length = encoded["input_ids"].shape[1]
    score_diff = (ours["pred_logits"].sigmoid() - theirs.logits.sigmoid())[..., :length]
    assert score_diff.abs().max() < TOKEN_TOL
    box_diff = (ours["pred_boxes"] - theirs.pred_boxes).abs() * torch.tensor([128, 96, 128, 96])
    assert box_diff.max() < BOX_TOL_PX

    # The processor resizes and normalises as this model's preprocessing does.
    assert processor.image_processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    mean = torch.tensor(processor.image_processor.image_mean) * 255
    assert torch.allclose(mean, model.pixel_mean.flatten().cpu(), atol=1e-4)

    # Never written over.
    assert to_hf_main([str(config), str(weights), str(out)]) == 1
    refusal = capsys.readouterr().err
    assert f"{out / 'config.json'}, " in refusal
    assert "exist; this command does not write over files: pass --force" in refusal


def test_parameters_transformers_lacks_are_refused_by_name(converted_tiny, tmp_path, capsys):
    from grounding_dino.convert.to_hf import main

    _, out_dir, _ = converted_tiny
    # The demo head's learned logit scale and bias (shapes_tiny.py's head) on the converted model.
    learned_scale = ["model.head.bias_init=-4.6", "model.head.log_scale_init=0.0"]
    state = torch.load(out_dir / "model.pth", weights_only=True)["model"]
    state.update({"head.bias": torch.tensor(-4.2), "head.log_scale": torch.tensor(0.3)})
    torch.save({"model": state}, tmp_path / "with_scale.pth")
    code = main(
        [str(out_dir / "config.yaml"), str(tmp_path / "with_scale.pth"), str(tmp_path / "hf")]
        + learned_scale
    )
    assert code == 1
    assert "has no parameter for: head.bias, head.log_scale" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_settings_transformers_cannot_hold_are_refused_by_name():
    from transformers import BertConfig

    from grounding_dino.convert.to_hf import hf_config_from_lazy
    from grounding_dino.model_zoo import get_config

    resnet = get_config("grounding_dino_r50.py").model
    with pytest.raises(ValueError, match="model.backbone.name='ResNetBackbone'"):
        hf_config_from_lazy(resnet, BertConfig())
    demo = get_config("shapes_tiny.py").model  # the demo's enhancer sizes and MiniLM at ids + 1
    demo.backbone = get_config("grounding_dino_swin_t_ogc.py").model.backbone
    with pytest.raises(ValueError, match="model.enhancer.text_ffn_dim=512 .* has 256"):
        hf_config_from_lazy(demo, BertConfig())
    shifted = get_config("grounding_dino_swin_t_ogc.py").model
    shifted.text_encoder.bert_position_offset = 1
    with pytest.raises(ValueError, match="model.text_encoder.bert_position_offset=1"):
        hf_config_from_lazy(shifted, BertConfig())
    mixed = get_config("mm_grounding_dino_swin_t.py").model
    mixed.decoder.per_layer_box_heads = False
    with pytest.raises(ValueError, match="per_layer_box_heads=False with per-layer"):
        hf_config_from_lazy(mixed, BertConfig())


def test_interrupted_export_keeps_the_old_files_and_leaves_no_temporary(
    converted_tiny, tmp_path, monkeypatch
):
    from transformers import GroundingDinoForObjectDetection

    from grounding_dino.convert.to_hf import export_to_hf

    _, out_dir, _ = converted_tiny
    (tmp_path / "config.json").write_text('{"old": true}')

    def dies_midway(self, folder, **kwargs):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(GroundingDinoForObjectDetection, "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        export_to_hf(
            str(out_dir / "config.yaml"), str(out_dir / "model.pth"), str(tmp_path), force=True
        )
    assert os.listdir(tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == '{"old": true}'


@pytest.mark.parametrize("fine_tuned", ["grounding-dino"], indirect=True)
def test_lora_merged_weights_export_to_transformers(fine_tuned, tmp_path):
    """LoRA fine-tune -> merge -> transformers: the exported model gives the adapter model's
    outputs (the merged weights are plain weights of the same architecture)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from transformers import AutoModelForZeroShotObjectDetection

    from grounding_dino import model_zoo
    from grounding_dino.convert.to_hf import main as to_hf_main
    from grounding_dino.finetune.lora import add_lora, merge_lora

    _, _, config, weights, _ = fine_tuned
    model = model_zoo.get(str(config), weights=str(weights), device="cpu")
    tuner = add_lora(model, {"rank": 4})
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                parameter.normal_(0, 0.05)
    model.eval()
    caption = normalize_caption("a cat . a remote control .")
    image = torch.randn(3, 96, 128)
    run = PromptRun(0, caption, model.prompt_encoder.tokenize(caption)["input_ids"])
    with torch.no_grad():
        adapted = model.forward_transformer([image], [run])
    merged = merge_lora(tuner)
    merged_weights = tmp_path / "merged" / "model_final.pth"
    merged_weights.parent.mkdir()
    DetectionCheckpointer(merged, str(merged_weights.parent)).save("model_final")

    out = tmp_path / "hf"
    assert to_hf_main([str(config), str(merged_weights), str(out)]) == 0
    hf = AutoModelForZeroShotObjectDetection.from_pretrained(out).eval()
    encoded = hf_tokenize(out, caption)
    with torch.no_grad():
        theirs = hf(
            pixel_values=image[None], pixel_mask=torch.ones(1, 96, 128, dtype=torch.long), **encoded
        )
    length = encoded["input_ids"].shape[1]
    score_diff = (adapted["pred_logits"].sigmoid() - theirs.logits.sigmoid())[..., :length]
    assert score_diff.abs().max() < TOKEN_TOL
    box_diff = (adapted["pred_boxes"] - theirs.pred_boxes).abs() * torch.tensor([128, 96, 128, 96])
    assert box_diff.max() < BOX_TOL_PX


def hf_tokenize(folder, caption):
    """The exported folder's tokenizer on one caption (input ids, masks, token types)."""
    from transformers import AutoProcessor

    return dict(AutoProcessor.from_pretrained(folder).tokenizer([caption], return_tensors="pt"))
