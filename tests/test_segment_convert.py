"""``python -m grounding_dino.segment.convert``: original SAM / SAM 2 checkpoints -> transformers
folders.

A small random transformers model is written back in the ORIGINAL key layout by an inverse
mapping written here, independently of the converter, from the key names of the original
repositories (segment_anything's ``image_encoder.blocks.0.attn.qkv.weight``,
``prompt_encoder.point_embeddings.0.weight``, ``mask_decoder.output_upscaling.0.weight``,
``mask_decoder.iou_prediction_head.layers.0.weight``; sam2's ``image_encoder.trunk...``,
``sam_mask_decoder...``, plus its video modules). The CLI converts it back; the weights and the
masks must be identical. Unknown and missing keys are refused by name.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sam_reference import build_segmenter, save_segmenter

from grounding_dino.segment import MaskStage
from grounding_dino.segment.convert import _sam2_config, _sam_config, main


def _mlp_to_original(key, head, depth):
    """transformers ``<head>.proj_in / layers.i / proj_out`` -> original ``<head>.layers.j``."""
    prefix, rest = key.split(head + ".", 1)
    name, tail = rest.split(".", 1)
    if name == "proj_in":
        index = 0
    elif name == "proj_out":
        index = depth - 1
    else:  # "layers.i.weight"
        index, tail = int(tail.split(".", 1)[0]) + 1, tail.split(".", 1)[1]
    return f"{prefix}{head}.layers.{index}.{tail}"


SAM_NAMES = {  # transformers fragment -> original fragment
    "vision_encoder.": "image_encoder.",
    ".patch_embed.projection.": ".patch_embed.proj.",
    ".neck.conv1.": ".neck.0.",
    ".neck.layer_norm1.": ".neck.1.",
    ".neck.conv2.": ".neck.2.",
    ".neck.layer_norm2.": ".neck.3.",
    ".mask_embed.conv1.": ".mask_downscaling.0.",
    ".mask_embed.layer_norm1.": ".mask_downscaling.1.",
    ".mask_embed.conv2.": ".mask_downscaling.3.",
    ".mask_embed.layer_norm2.": ".mask_downscaling.4.",
    ".mask_embed.conv3.": ".mask_downscaling.6.",
    ".upscale_conv1.": ".output_upscaling.0.",
    ".upscale_layer_norm.": ".output_upscaling.1.",
    ".upscale_conv2.": ".output_upscaling.3.",
    ".layer_norm_final_attn.": ".norm_final_attn.",
}


def _heads(key):
    for head in ("iou_prediction_head", "pred_obj_score_head"):
        if f".{head}." in key:
            return head
    if ".output_hypernetworks_mlps." in key:
        return "output_hypernetworks_mlps." + key.split("output_hypernetworks_mlps.")[1][0]
    return None


def _common_to_original(key, depth=3):
    for new, old in SAM_NAMES.items():
        key = key.replace(new, old)
    for number in "1234":
        key = key.replace(f".layer_norm{number}.", f".norm{number}.")
    key = key.replace("image_encoder.layers.", "image_encoder.blocks.")
    key = key.replace(".point_embed.", ".point_embeddings.")
    head = _heads(key)
    return _mlp_to_original(key, head, depth) if head else key


def sam_to_original(state):
    """A transformers SamModel state dict -> segment_anything's key layout."""
    out = {}
    for key, value in state.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # transformers' tied copy
        if key == "shared_image_embedding.positional_embedding":
            out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
            continue
        out[_common_to_original(key)] = value
    return out


def sam2_to_original(state):
    """A transformers Sam2Model state dict -> sam2's key layout (video modules added)."""
    out = {}
    for key, value in state.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue
        if key == "shared_image_embedding.positional_embedding":
            out["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
        elif key == "no_memory_embedding":
            out["no_mem_embed"] = value
        elif key == "prompt_encoder.point_embed.weight":
            for index in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{index}.weight"] = value[
                    index : index + 1
                ]
        elif key.startswith("vision_encoder.neck.convs."):
            number, tail = key[len("vision_encoder.neck.convs.") :].split(".", 1)
            out[f"image_encoder.neck.convs.{number}.conv.{tail}"] = value
        elif key.startswith("vision_encoder.backbone."):
            key = "image_encoder.trunk." + key[len("vision_encoder.backbone.") :]
            key = key.replace(".patch_embed.projection.", ".patch_embed.proj.")
            key = key.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
            key = key.replace(".mlp.proj_in.", ".mlp.layers.0.")
            out[key.replace(".mlp.proj_out.", ".mlp.layers.1.")] = value
        else:
            key = _common_to_original(key)
            key = key.replace(".o_proj.", ".out_proj.")
            key = key.replace(".mlp.proj_in.", ".mlp.layers.0.")
            key = key.replace(".mlp.proj_out.", ".mlp.layers.1.")
            key = key.replace("prompt_encoder.", "sam_prompt_encoder.", 1)
            out[key.replace("mask_decoder.", "sam_mask_decoder.", 1)] = value
    # The video modules of a sam2.1 checkpoint, which the image model has no use for.
    out["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.randn(4, 4)
    out["memory_encoder.fuser.layers.0.gamma"] = torch.randn(4)
    out["maskmem_tpos_enc"] = torch.randn(7, 1, 1, 4)
    out["obj_ptr_proj.layers.0.weight"] = torch.randn(4, 4)
    out["no_obj_embed_spatial"] = torch.randn(1, 4)
    return out


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
    original = (sam_to_original if kind == "sam" else sam2_to_original)(model.state_dict())
    assert any(k.startswith("image_encoder.blocks.0.attn.qkv") for k in original) or kind == "sam2"
    checkpoint = tmp_path / f"{kind}_original.pth"
    torch.save(original if kind == "sam" else {"model": original}, checkpoint)
    model.config.to_json_file(tmp_path / "config.json")  # the tiny size is no released variant

    out = tmp_path / "converted"
    result = _convert_cli(kind, checkpoint, out, "--config", tmp_path / "config.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out} ({kind}, --config" in result.stdout
    if kind == "sam2":
        assert "dropped: 5 keys of SAM 2's video modules" in result.stdout
        assert "memory_attention" in result.stdout
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
