"""``python -m grounding_dino.segment.convert``: original SAM / SAM 2 checkpoints -> transformers
folders.

A small random transformers model is written back in the ORIGINAL key layout by the inverse
mapping of ``sam_original_layout`` (written independently of the converter, after transformers'
own conversion scripts and the original modules), with a sam2.1 file's video modules. The CLI
converts it back; the weights and the masks must be identical. The released structures (SAM
ViT-B/L/H, SAM 2.1 Hiera-T/S/B+/L, built on the meta device: names and shapes, no memory) map
name for name, and literal key names of ``sam_vit_h_4b8939.pth`` / ``sam2.1_hiera_large.pt``
land where transformers' converter puts them. Unknown and missing keys are refused by name.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sam_original_layout import (
    SAM21_HIERA_L_EXAMPLES,
    SAM21_VIDEO_KEYS,
    SAM_VIT_H_EXAMPLES,
    sam2_to_original,
    sam_to_original,
)
from sam_reference import build_segmenter, save_segmenter

from grounding_dino.segment import MaskStage
from grounding_dino.segment.convert import (
    SAM2_VARIANTS,
    SAM_VARIANTS,
    _check_fit,
    _processor,
    _processor_normalization,
    _renamed_state,
    _sam2_config,
    _sam_config,
    _split_normalization,
    main,
)
from grounding_dino.segment.convert_keys import sam2_key, sam_key


def _convert_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "grounding_dino.segment.convert", *map(str, args)],
        capture_output=True,
        text=True,
    )


def _image():
    return np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_original_layout_converts_to_identical_outputs(tmp_path, kind):
    model, processor = build_segmenter(kind, seed=4)
    reference = save_segmenter(model, processor, tmp_path / "reference")
    if kind == "sam":  # with segment_anything's normalization buffers, as some files have
        original = sam_to_original(model.state_dict(), normalization=True)
    else:
        original = sam2_to_original(model.state_dict())
    checkpoint = tmp_path / f"{kind}_original.pth"
    torch.save(original if kind == "sam" else {"model": original}, checkpoint)
    model.config.to_json_file(tmp_path / "config.json")  # the tiny size is no released variant

    out = tmp_path / "converted"
    result = _convert_cli(kind, checkpoint, out, "--config", tmp_path / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out} ({kind}, --config" in result.stdout
    if kind == "sam2":
        assert f"dropped: {len(SAM21_VIDEO_KEYS)} keys of SAM 2's video modules" in result.stdout
        assert "memory_attention" in result.stdout and "no_obj_embed_spatial" in result.stdout
    else:
        assert "pixel_mean / pixel_std: mean [0.485, 0.456, 0.406]" in result.stdout
        assert "the processor's own ImageNet normalization, kept" in result.stdout
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(out))

    converted = MaskStage.from_pretrained(str(out))
    for key, value in model.state_dict().items():
        assert torch.equal(converted.model.state_dict()[key], value), key
    boxes = torch.tensor([[2.0, 3.0, 30.0, 35.0], [10.0, 0.0, 55.0, 20.0]])
    ours, theirs = converted(_image(), boxes), MaskStage.from_pretrained(reference)(_image(), boxes)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.masks, theirs.masks)
    assert torch.equal(ours.scores, theirs.scores)


def test_existing_output_is_not_replaced_without_force(tmp_path, capsys):
    model, processor = build_segmenter("sam", seed=6)
    torch.save(sam_to_original(model.state_dict()), tmp_path / "sam.pth")
    model.config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    args = ["sam", str(tmp_path / "sam.pth"), str(out), "--config", str(tmp_path / "config.json")]
    assert main(args) == 1
    assert "config.json exists" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}" and not (out / "model.safetensors").exists()
    assert main(args + ["--force"]) == 0
    assert MaskStage.from_pretrained(str(out)).kind == "sam"
    assert [name for name in os.listdir(out) if name.startswith(".")] == []


def test_unknown_and_missing_keys_are_refused_by_name(tmp_path, capsys):
    model, _ = build_segmenter("sam", seed=5)
    model.config.to_json_file(tmp_path / "config.json")
    original = sam_to_original(model.state_dict())
    cases = {
        "unknown": {**original, "image_encoder.blocks.0.attn.extra_scale": torch.ones(1)},
        "missing": {k: v for k, v in original.items() if k != "mask_decoder.iou_token.weight"},
        "other model": {"backbone.body.conv1.weight": torch.ones(1)},
    }
    expected = {
        "unknown": "image_encoder.blocks.0.attn.extra_scale",
        "missing": "missing 1 [mask_decoder.iou_token.weight]",
        "other model": "keys of no sam layout: backbone.body.conv1.weight",
    }
    for name, state in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        code = main(
            ["sam", str(path), str(tmp_path / name), "--config", str(tmp_path / "config.json")]
        )
        assert code == 1
        assert expected[name] in capsys.readouterr().err, name
        assert not os.path.exists(tmp_path / name / "model.safetensors")


def test_released_variants_are_read_from_the_shapes():
    vit_h = {"image_encoder.patch_embed.proj.weight": torch.empty(1280, 3, 16, 16)}
    config, variant = _sam_config(vit_h, None)
    assert variant == "vit_h" and config.vision_config.num_hidden_layers == 32
    assert config.vision_config.global_attn_indexes == [7, 15, 23, 31]
    with pytest.raises(ValueError, match="--variant vit_b was asked.*vit_h"):
        _sam_config(vit_h, "vit_b")
    with pytest.raises(ValueError, match="width 100.*--config"):
        _sam_config({"image_encoder.patch_embed.proj.weight": torch.empty(100, 3, 16, 16)}, None)
    large = {"image_encoder.trunk.patch_embed.proj.weight": torch.empty(144, 3, 7, 7)}
    large.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": None for i in range(48)})
    config, variant = _sam2_config(large, None)
    backbone = config.vision_config.backbone_config
    assert variant == "hiera_l" and backbone.embed_dim_per_stage == [144, 288, 576, 1152]
    assert config.vision_config.backbone_channel_list == [1152, 576, 288, 144]
    assert backbone.num_attention_heads_per_stage == [2, 4, 8, 16]
    json.dumps(config.to_dict())


def _meta_model(kind, variant):
    """The transformers model of a released variant on the meta device: names and shapes of
    the full-size model, no memory, built in well under a second."""
    from transformers import Sam2Model, SamModel

    if kind == "sam":
        width = SAM_VARIANTS[variant]["hidden_size"]
        probe = {"image_encoder.patch_embed.proj.weight": torch.empty(width, 3, 16, 16)}
        config, _ = _sam_config(probe, variant)
        model_class = SamModel
    else:
        spec = SAM2_VARIANTS[variant]
        probe = {"image_encoder.trunk.patch_embed.proj.weight": torch.empty(spec["hidden_size"])}
        blocks = sum(spec["blocks_per_stage"])
        probe.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": None for i in range(blocks)})
        config, _ = _sam2_config(probe, variant)
        model_class = Sam2Model
    with torch.device("meta"):
        return model_class(config)


RELEASED = [("sam", name) for name in SAM_VARIANTS] + [("sam2", name) for name in SAM2_VARIANTS]


@pytest.mark.parametrize("kind, variant", RELEASED)
def test_released_structures_convert_name_for_name(kind, variant):
    expected = _meta_model(kind, variant).state_dict()
    if kind == "sam":
        original = sam_to_original(expected)
    else:
        original = sam2_to_original(expected)  # with a sam2.1 file's video modules
    assert (_sam_config if kind == "sam" else _sam2_config)(original, None)[1] == variant
    renamed, dropped, origins = _renamed_state(kind, original, "released")
    _check_fit(renamed, origins, expected, f"{kind} {variant}")  # raises, naming the keys
    assert sorted(dropped) == (sorted(SAM21_VIDEO_KEYS) if kind == "sam2" else [])


@pytest.mark.parametrize(
    "kind, variant, examples",
    [("sam", "vit_h", SAM_VIT_H_EXAMPLES), ("sam2", "hiera_l", SAM21_HIERA_L_EXAMPLES)],
)
def test_real_key_names_land_where_transformers_converter_puts_them(kind, variant, examples):
    from grounding_dino.segment.convert_keys import mlp_depths

    expected = _meta_model(kind, variant).state_dict()
    original = (sam_to_original if kind == "sam" else sam2_to_original)(expected)
    rename, depths = (sam_key if kind == "sam" else sam2_key), mlp_depths(original)
    for old, new in examples:
        assert old in original, f"the test's original layout lacks the real name {old}"
        assert rename(old, depths) == new, old
        assert new in expected, new
    if kind == "sam2":
        points = [f"sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
        assert [tuple(original[name].shape) for name in points] == [(1, 256)] * 4
        renamed, dropped, _ = _renamed_state(kind, original, "sam2.1_hiera_large.pt")
        assert tuple(renamed["prompt_encoder.point_embed.weight"].shape) == (4, 256)
        assert len(dropped) == len(SAM21_VIDEO_KEYS) == 19
        assert tuple(original["no_mem_embed"].shape) == (1, 1, 256)  # copied as is


def test_sam2_point_embeddings_are_stacked_in_index_order():
    from grounding_dino.segment.convert_keys import stack_sam2_point_embeddings

    state = {
        f"sam_prompt_encoder.point_embeddings.{i}.weight": torch.full((1, 2), float(i))
        for i in (2, 0, 3, 1)
    }
    stacked = stack_sam2_point_embeddings(state)
    assert list(stacked) == ["sam_prompt_encoder.point_embed.weight"]
    expected = torch.arange(4.0)[:, None].expand(4, 2)
    assert torch.equal(stacked["sam_prompt_encoder.point_embed.weight"], expected)


def test_sam_pixel_normalization_goes_to_the_processor():
    state = {
        "mask_decoder.iou_token.weight": torch.ones(1, 4),
        "pixel_mean": torch.tensor([100.0, 110.0, 120.0]).view(-1, 1, 1),
        "pixel_std": torch.tensor([50.0, 51.0, 52.0]).view(-1, 1, 1),
    }
    rest, normalization = _split_normalization(state, "custom.pth")
    assert list(rest) == ["mask_decoder.iou_token.weight"]
    assert normalization["image_mean"] == pytest.approx([100 / 255, 110 / 255, 120 / 255])
    processor = _processor("sam", 64, _processor_normalization(normalization))
    assert processor.image_processor.image_std == pytest.approx([50 / 255, 51 / 255, 52 / 255])
    # The released normalization (ImageNet's) keeps the processor's own values, bit for bit.
    _, imagenet = _split_normalization(sam_to_original({}, normalization=True), "sam.pth")
    assert imagenet and _processor_normalization(imagenet) == {}
    with pytest.raises(ValueError, match="sam.pth has pixel_mean without"):
        _split_normalization({"pixel_mean": torch.ones(3)}, "sam.pth")
