"""The mask stage (``grounding_dino.segment``) against transformers' own segmenters.

Small random ``SamModel``, ``SamHQModel`` and ``Sam2Model`` (every parameter perturbed) are
saved with ``save_pretrained`` and their processors (configured for 64 px / 128 px inputs
instead of 1024, see tests/sam_reference.py). The stage must give what calling transformers'
model directly gives with the same boxes, processor and ``multimask_output=False``: mask logits
to 1e-4, masks identical except pixels whose logit is within 1e-4 of the threshold, the same
IoU scores; any box batch size gives what one box at a time gives.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sam_reference import tiny_segmenter_folder

from grounding_dino.segment import MaskStage, add_instances_masks
from grounding_dino.segment.rle import masks_to_rle, rle_to_masks

LOGIT_TOL = 1e-4
KINDS = ["sam", "sam_hq", "sam2"]


@pytest.fixture(scope="module")
def segmenters(tmp_path_factory):
    """``{kind: (transformers model, processor, saved folder)}``, built once."""
    return {
        kind: tiny_segmenter_folder(kind, tmp_path_factory.mktemp(kind), seed=index)
        for index, kind in enumerate(KINDS)
    }


def _image(seed=0, height=50, width=70):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image[10:30, 15:45] = (200, 40, 40)  # a flat object for the boxes to hold
    return image


def _boxes(height=50, width=70, count=5, seed=0):
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 1, (count, 2, 2)) * np.array([width, height])
    boxes = np.concatenate([corners.min(1), corners.max(1) + 2], axis=1)
    return torch.tensor(boxes, dtype=torch.float32)


@torch.no_grad()
def _transformers_masks(kind, model, processor, image, boxes):
    """transformers' own path: the processor, the whole model (image included), the
    processor's post-processing. Returns (logits (N, H, W), iou scores (N,))."""
    inputs = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    output = model(
        pixel_values=inputs["pixel_values"],
        input_boxes=inputs["input_boxes"],
        multimask_output=False,
    )
    sizes = [inputs["original_sizes"]]
    if kind != "sam2":
        sizes.append(inputs["reshaped_input_sizes"])
    (logits,) = processor.post_process_masks(output.pred_masks, *sizes, binarize=False)
    return logits[:, 0], output.iou_scores[0, :, 0]


def _assert_masks_match(ours, logits, threshold=0.0):
    """Masks equal ``logits > threshold`` except where the logit is within 1e-4 of it."""
    decided = (logits - threshold).abs() > LOGIT_TOL
    expected = logits > threshold
    assert torch.equal(ours[decided], expected[decided])
    assert decided.float().mean() > 0.99  # the exemption covers almost nothing


@pytest.mark.parametrize("kind", KINDS)
def test_masks_and_scores_equal_transformers(segmenters, kind):
    model, processor, folder = segmenters[kind]
    stage = MaskStage.from_pretrained(folder)
    assert stage.kind == kind
    image, boxes = _image(), _boxes()
    out = stage(image, boxes)
    ref_logits, ref_scores = _transformers_masks(kind, model, processor, image, boxes)
    assert out.masks.shape == (5, 50, 70) and out.masks.dtype == torch.bool
    assert out.logits.shape == (5, 50, 70) and out.scores.shape == (5,)
    assert (out.logits - ref_logits).abs().max() < LOGIT_TOL
    assert (out.scores - ref_scores).abs().max() < LOGIT_TOL
    _assert_masks_match(out.masks, ref_logits)
    # The masks depend on the box: not all the same, not all empty or full.
    assert not torch.equal(out.masks[0], out.masks[1])
    assert 0 < out.masks.float().mean() < 1
    # Another threshold (inside the logits' range) is applied to the same logits.
    threshold = float(ref_logits.quantile(0.3))
    shifted = MaskStage.from_pretrained(folder, mask_threshold=threshold)(image, boxes)
    _assert_masks_match(shifted.masks, ref_logits, threshold=threshold)
    assert not torch.equal(shifted.masks, out.masks)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_box_batches_equal_one_box_at_a_time(segmenters, kind):
    _, _, folder = segmenters[kind]
    image, boxes = _image(seed=1, height=61, width=45), _boxes(61, 45, count=7, seed=1)
    stage = MaskStage.from_pretrained(folder, box_batch_size=3)
    batched = stage(image, boxes)
    stage.box_batch_size = 64
    whole = stage(image, boxes)
    for index in range(len(boxes)):
        alone = stage(image, boxes[index : index + 1])
        assert (alone.logits[0] - batched.logits[index]).abs().max() < LOGIT_TOL
        assert (alone.scores[0] - batched.scores[index]).abs() < LOGIT_TOL
        _assert_masks_match(batched.masks[index], alone.logits[0])
    assert (whole.logits - batched.logits).abs().max() < LOGIT_TOL
    _assert_masks_match(whole.masks, batched.logits)


def test_the_image_embedding_is_computed_once_per_image(segmenters):
    _, _, folder = segmenters["sam"]
    stage = MaskStage.from_pretrained(folder, box_batch_size=2)
    calls = []
    stage.model.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    decoder_calls = []
    stage.model.mask_decoder.register_forward_hook(lambda *args: decoder_calls.append(1))
    stage(_image(), _boxes(count=5))
    assert len(calls) == 1 and len(decoder_calls) == 3  # 5 boxes in batches of 2


@pytest.mark.parametrize("kind", KINDS)
def test_no_boxes_gives_empty_masks(segmenters, kind):
    stage = MaskStage.from_pretrained(segmenters[kind][2])
    out = stage(_image(), torch.zeros((0, 4)))
    assert out.masks.shape == (0, 50, 70) and out.masks.dtype == torch.bool
    assert out.scores.shape == (0,) and out.logits.shape == (0, 50, 70)


def test_add_instances_masks_fills_the_instances(segmenters):
    from detectron2.structures import Boxes, Instances

    stage = MaskStage.from_pretrained(segmenters["sam"][2])
    image, boxes = _image(), _boxes(count=3)
    instances = Instances((50, 70), pred_boxes=Boxes(boxes), scores=torch.ones(3))
    add_instances_masks(instances, image, stage)
    direct = stage(image, boxes)
    assert torch.equal(instances.pred_masks, direct.masks)
    assert torch.equal(instances.mask_scores, direct.scores)
    empty = add_instances_masks(
        Instances((50, 70), pred_boxes=Boxes(torch.zeros(0, 4))), image, stage
    )
    assert empty.pred_masks.shape == (0, 50, 70)
    with pytest.raises(ValueError, match=r"\(40, 70\)"):
        add_instances_masks(Instances((40, 70), pred_boxes=Boxes(boxes)), image, stage)


def test_bad_inputs_are_refused_by_name(segmenters):
    stage = MaskStage.from_pretrained(segmenters["sam"][2])
    with pytest.raises(ValueError, match="uint8 RGB image"):
        stage(_image().astype(np.float32), _boxes())
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        stage(_image(), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        stage(_image(), torch.tensor([[0.0, 0.0, float("nan"), 4.0]]))
    with pytest.raises(ValueError, match="box_batch_size"):
        MaskStage.from_pretrained(segmenters["sam"][2], box_batch_size=0)
    with pytest.raises(ValueError, match="fp16"):
        MaskStage.from_pretrained(segmenters["sam"][2], dtype="fp16")
    with pytest.raises(ValueError, match="CUDA is not available"):
        MaskStage.from_pretrained(segmenters["sam"][2], device="cuda")
    assert MaskStage.from_pretrained(segmenters["sam"][2], device="auto").device.type == "cpu"


def test_a_wrong_folder_gets_a_clear_error(segmenters, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        MaskStage.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        MaskStage.from_pretrained(str(tmp_path))
    source = segmenters["sam"][2]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        MaskStage.from_pretrained(str(tmp_path))
    config = json.load(open(os.path.join(source, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        MaskStage.from_pretrained(str(tmp_path))
    weights = load_file(os.path.join(source, "model.safetensors"))
    dropped = "mask_decoder.iou_prediction_head.proj_out.weight"
    assert dropped in weights
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json does not exist"):
        MaskStage.from_pretrained(str(tmp_path))
    for name in os.listdir(source):
        if name.startswith("preprocessor") or name.startswith("processor"):
            (tmp_path / name).write_bytes(open(os.path.join(source, name), "rb").read())
    with pytest.raises(ValueError, match=f"missing 1 \\({dropped}\\)"):
        MaskStage.from_pretrained(str(tmp_path))


def test_rle_round_trip_with_pycocotools():
    from pycocotools import mask as mask_utils

    masks = torch.from_numpy(np.random.default_rng(0).uniform(size=(3, 17, 23)) > 0.6)
    rles = masks_to_rle(masks)
    assert all(isinstance(rle["counts"], str) and rle["size"] == [17, 23] for rle in rles)
    json.dumps(rles)
    assert torch.equal(rle_to_masks(rles), masks)
    decoded = mask_utils.decode([{**r, "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert [int(a) for a in mask_utils.area(mask_utils.encode(np.asfortranarray(decoded)))] == [
        int(m.sum()) for m in masks
    ]
    assert masks_to_rle(torch.zeros((0, 5, 5), dtype=torch.bool)) == []


def test_sam_command_line_arguments(segmenters):
    import argparse

    from grounding_dino.segment.cli import add_sam_arguments, mask_stage_from_args

    parser = argparse.ArgumentParser()
    add_sam_arguments(parser)
    assert mask_stage_from_args(parser.parse_args([]), device="cpu", dtype="fp32") is None
    args = parser.parse_args(["--sam", segmenters["sam2"][2], "--sam-batch-size", "5"])
    stage = mask_stage_from_args(args, device="cpu", dtype="fp32")
    assert stage.kind == "sam2" and stage.box_batch_size == 5
    with pytest.raises(ValueError, match="box_batch_size must be at least 1"):
        mask_stage_from_args(
            parser.parse_args(["--sam", segmenters["sam"][2], "--sam-batch-size", "0"]),
            device="cpu",
            dtype="fp32",
        )


def test_benchmark_tool_prints_its_table(tmp_path, capsys, monkeypatch):
    """``tools/benchmark_masks.py`` on tiny models, in this process (a benchmark: nothing about
    speed is asserted, only that it runs and reports every entry)."""
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    monkeypatch.syspath_prepend(str(tools))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # keep the suite's
    import benchmark_masks

    args = ["--tiny", "--no-detector", "--runs", "1", "--boxes", "1", "3", "--size", "64x80"]
    assert benchmark_masks.main(args + ["--json", str(tmp_path / "times.json")]) == 0
    out = capsys.readouterr().out
    assert "| SAM ViT-B |" in out and "| SAM 2.1 Hiera-T |" in out and "load average" in out
    results = json.loads((tmp_path / "times.json").read_text())
    assert set(results["SAM ViT-B"]) == {"embedding", "1 boxes", "3 boxes"}
    assert all(entry["median_s"] > 0 for entry in results["SAM 2.1 Hiera-T"].values())
    assert "sam_reference" in sys.modules  # --tiny used the tests' tiny models


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_bf16_runs_under_autocast_and_returns_float32(segmenters, kind):
    folder = segmenters[kind][2]
    image, boxes = _image(), _boxes()
    fp32 = MaskStage.from_pretrained(folder)(image, boxes)
    bf16 = MaskStage.from_pretrained(folder, dtype="bf16")(image, boxes)
    assert bf16.logits.dtype == torch.float32 and bf16.scores.dtype == torch.float32
    assert not torch.equal(bf16.logits, fp32.logits)  # it did run in bfloat16
    if kind == "sam":
        # The logits follow fp32's. (The random SAM 2, whose logits reach +-100, amplifies
        # bf16 rounding too much for a comparison: logit correlation 0.46 there.)
        pair = torch.stack([bf16.logits.flatten(), fp32.logits.flatten()])
        assert torch.corrcoef(pair)[0, 1] > 0.95
