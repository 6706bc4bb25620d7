"""Precision modes (``grounding_dino.precision``): the predictor's ``dtype=`` (bf16 autocast on
the CPU, fp16 refused there, float32 outputs), ``--dtype`` of the demo and labelling CLIs, and
``tools/evaluate_precision.py`` run as a user runs it on a model trained for a few iterations."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances

from grounding_dino import precision
from grounding_dino.model_zoo import get_config, get_config_file
from grounding_dino.precision import check_precision, outputs_to_fp32, precision_context
from grounding_dino.predictor import GroundingDINOPredictor

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
OVERRIDES = [  # 128 px and 20 queries: fast on the CPU
    "dataloader.test.mapper.augmentations.min_size=128",
    "dataloader.test.mapper.augmentations.max_size=128",
    "model.query_selector.num_queries=20",
]
CLASSES = ["red circle", "blue square", "green star"]


def _image(seed: int, height: int = 96, width: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random weights of a small ``shapes_tiny.py`` model and a folder of two images. The box
    heads (``bbox_embed``, zero-initialised: every box would be an encoder proposal, equal in
    any precision) are perturbed so that boxes are computed, and can differ, in bf16."""
    root = tmp_path_factory.mktemp("precision")
    cfg = get_config("shapes_tiny.py")
    cfg.model.query_selector.num_queries = 20
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bbox_embed" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    weights = root / "tiny.pth"
    torch.save({"model": model.state_dict()}, weights)
    images = root / "photos"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"img{i}.png"), _image(i))
    return {"root": root, "weights": str(weights), "images": images}


def _predictor(tiny, dtype):
    return GroundingDINOPredictor.from_config_file(
        get_config_file("shapes_tiny.py"), tiny["weights"], OVERRIDES, dtype=dtype
    )


# ------------------------------------------------------------------------------ the module
def test_modes_are_checked_against_the_device():
    assert check_precision("fp32", "cpu") == "fp32"
    assert check_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"dtype='fp16' is not offered on the CPU.*bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match=r"dtype='int8' is not a precision mode; choose one of"):
        check_precision("int8", "cpu")
    with pytest.raises(ValueError, match="needs a CPU or CUDA device, the model is on meta"):
        check_precision("bf16", "meta")


def test_bf16_on_a_cpu_without_native_bf16_is_refused_unless_asked(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv(precision.ALLOW_EMULATED_BF16_ENV, raising=False)
    with pytest.raises(ValueError) as refused:
        check_precision("bf16", "cpu")
    # The message gives both times' order of magnitude and the two ways to insist.
    for words in ("tens of times slower than fp32", "minutes instead of seconds", "41x"):
        assert words in str(refused.value)
    assert "allow_emulated_bf16=True" in str(refused.value)
    assert f"{precision.ALLOW_EMULATED_BF16_ENV}=1" in str(refused.value)
    assert check_precision("bf16", "cpu", allow_emulated_bf16=True) == "bf16"
    monkeypatch.setenv(precision.ALLOW_EMULATED_BF16_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="grounding_dino.precision"):
        check_precision("bf16", "cpu")
    assert "without native bfloat16" in caplog.text and "as asked" in caplog.text
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="grounding_dino.precision"):
        check_precision("bf16", "cpu")
    assert caplog.text == ""


def test_outputs_are_cast_to_float32_and_integers_kept():
    instances = Instances(
        (10, 10),
        pred_boxes=Boxes(torch.rand(3, 4).bfloat16()),
        scores=torch.rand(3).bfloat16(),
        token_scores=torch.rand(3, 5).half(),
        pred_classes=torch.tensor([0, 2, 1]),
    )
    (output,) = outputs_to_fp32([{"instances": instances, "phrases": ["a", "b", "c"]}])
    result = output["instances"]
    assert result.pred_boxes.tensor.dtype == result.scores.dtype == torch.float32
    assert result.token_scores.dtype == torch.float32
    assert result.pred_classes.dtype == torch.int64


def test_precision_context_is_autocast_for_bf16_only():
    linear = torch.nn.Linear(4, 4)
    with precision_context("bf16", "cpu"):
        assert linear(torch.rand(2, 4)).dtype == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert linear(torch.rand(2, 4)).dtype == torch.float32


# ------------------------------------------------------------------------------ predictor
def test_predictor_bf16_computes_in_bf16_and_returns_float32(tiny):
    fp32, bf16 = _predictor(tiny, "fp32"), _predictor(tiny, "bf16")
    seen = []
    for module in bf16.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    image = _image(0)
    out, reference = bf16(image, CLASSES), fp32(image, CLASSES)
    assert seen and set(seen) == {torch.bfloat16}
    instances = out["instances"]
    assert len(instances) == len(reference["instances"]) > 0
    for field in ("scores", "token_scores"):
        assert instances.get(field).dtype == torch.float32
    assert instances.pred_boxes.tensor.dtype == torch.float32
    # Rounded, not equal: bf16 keeps 8 bits of mantissa.
    assert not torch.equal(instances.scores, reference["instances"].scores)
    batch = bf16.predict_batch([image, _image(1)], [CLASSES, CLASSES])
    assert all(o["instances"].scores.dtype == torch.float32 for o in batch)
    # In bf16 a batch equals one-by-one calls only to bf16 rounding (fp32: exactly).
    torch.testing.assert_close(batch[0]["instances"].scores, instances.scores, atol=0.01, rtol=0)


class _PinnedTopk:
    """Stands for ``torch`` in :mod:`grounding_dino.modeling.query_selector`: records the
    query selection's ``topk`` indices (``record``), or returns the recorded ones with this
    run's values (``replay``)."""

    def __init__(self):
        self.replay, self.indices = False, None

    def __getattr__(self, name):
        return getattr(torch, name)

    def topk(self, *args, **kwargs):
        result = torch.topk(*args, **kwargs)
        if not self.replay:
            self.indices = result.indices
            return result
        assert self.indices is not None and self.indices.shape == result.indices.shape
        return torch.return_types.topk((result.values, self.indices))


def _network_outputs_and_detections(predictor, image):
    """A predictor call's detections, and the token probabilities (over the caption's
    tokens) and boxes of its network pass, as float32."""
    model, captured = predictor.model, []
    forward_transformer = model.forward_transformer

    def capture(images, runs, targets=None):
        captured.append(forward_transformer(images, runs, targets))
        return captured[-1]

    model.forward_transformer = capture
    try:
        instances = predictor(image, CLASSES)["instances"]
    finally:
        del model.forward_transformer  # the class's method again
    (outputs,) = captured
    probs = outputs["pred_logits"][0][:, outputs["text_mask"][0]].float().sigmoid()
    return probs, outputs["pred_boxes"][0].float(), instances


# bf16 against fp32, same weights and input. bf16 keeps 8 significant bits (a rounding error
# of up to 2^-9 = 0.2% on each matmul/convolution input); through the backbone, BERT, the
# enhancer and the decoder, the token logits (|logit| <= 5.6 here) drift by up to 0.07. Worst
# differences over 8 random images through the predictor, measured on this machine natively
# (AVX-512 bf16) / with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2 (an AVX2-only CPU's kernels): token probabilities 0.0051 /
# 0.0064, detection scores 0.0030 / 0.0043, normalised boxes 0.0033 / 0.0041 (0.5 px at 128
# px). The tolerances are about twice the worst: a bf16 output further from fp32 than that (a
# lost layer, a garbled cast, another input's output) is a bug, not rounding.
BF16_SCORE_ATOL = 0.013
BF16_BOX_ATOL = 0.009


def test_bf16_outputs_equal_fp32_within_bf16_rounding(tiny, monkeypatch):
    """
    Proves that bf16 computes the same function as fp32 up to bf16 rounding: on the same
    weights and images, the bf16 token probabilities, boxes and detection scores are within
    the measured tolerances of fp32's (bf16 logits perturbed by 0.15, or boxes by 0.01, were
    checked to fail).

    The query selection (top-k of the encoder's token scores) is a discrete choice: in a
    random model many scores are nearly tied, and rounding may swap neighbours, which pairs
    other proposals with the rank-ordered content queries and changes outputs by more than
    rounding. So the bf16 run reuses fp32's selection (its own must share most tokens with
    it), and every remaining difference is numerical.
    """
    import grounding_dino.modeling.query_selector as query_selector

    fp32, bf16 = _predictor(tiny, "fp32"), _predictor(tiny, "bf16")
    for seed in range(4):
        image = _image(seed)
        pin = _PinnedTopk()
        with monkeypatch.context() as patch:
            patch.setattr(query_selector, "torch", pin)
            _network_outputs_and_detections(bf16, image)
            own_selection = set(pin.indices.flatten().tolist())
            probs, boxes, detections = _network_outputs_and_detections(fp32, image)
            assert len(own_selection & set(pin.indices.flatten().tolist())) >= 15, seed
            pin.replay = True
            probs_bf16, boxes_bf16, detections_bf16 = _network_outputs_and_detections(bf16, image)
        assert detections_bf16.scores.dtype == torch.float32
        torch.testing.assert_close(probs_bf16, probs, atol=BF16_SCORE_ATOL, rtol=0)
        torch.testing.assert_close(boxes_bf16, boxes, atol=BF16_BOX_ATOL, rtol=0)
        # The detections: (query, category) pairs ranked by score; sorting moves no score
        # further than the largest per-pair difference.
        assert len(detections_bf16) == len(detections) > 0
        torch.testing.assert_close(
            detections_bf16.scores.sort().values,
            detections.scores.sort().values,
            atol=BF16_SCORE_ATOL,
            rtol=0,
        )


def test_predictor_refuses_fp16_on_the_cpu(tiny):
    with pytest.raises(ValueError, match="dtype='fp16' is not offered on the CPU"):
        _predictor(tiny, "fp16")


# ------------------------------------------------------------------------------ the CLIs
def _demo(tiny, output, dtype):
    command = [
        sys.executable,
        str(REPO / "demo" / "demo.py"),
        "--config-file",
        get_config_file("shapes_tiny.py"),
        "--weights",
        tiny["weights"],
        "--input",
        str(tiny["images"]),
        "--prompt",
        ", ".join(CLASSES),
        "--json",
        str(output),
        "--box-threshold",
        "0",
        "--dtype",
        dtype,
        "--opts",
        *OVERRIDES,
    ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_demo_cli_dtype(tiny):
    done = _demo(tiny, tiny["root"] / "bf16.json", "bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tiny["root"] / "bf16.json").read_text())
    assert {r["file_name"].rsplit("/", 1)[-1] for r in records} == {"img0.png", "img1.png"}
    refused = _demo(tiny, tiny["root"] / "fp16.json", "fp16")
    assert refused.returncode == 2 and "dtype='fp16' is not offered on the CPU" in refused.stderr


def _label(tiny, output, dtype):
    command = [
        sys.executable,
        "-m",
        "grounding_dino.label",
        "--config-file",
        get_config_file("shapes_tiny.py"),
        "--weights",
        tiny["weights"],
        "--input",
        str(tiny["images"]),
        "--classes",
        ", ".join(CLASSES),
        "--output",
        str(output),
        "--box-threshold",
        "0",
        "--decode-workers",
        "0",
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--opts",
        *OVERRIDES,
    ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_label_cli_dtype_is_part_of_the_run(tiny):
    output = tiny["root"] / "labels" / "labels.json"
    done = _label(tiny, output, "bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    dataset = json.loads(output.read_text())
    assert len(dataset["images"]) == 2 and dataset["info"]["dtype"] == "bf16"
    # Resuming with another precision would mix two models' labels: refused, saying why.
    again = _label(tiny, output, "fp32")
    assert again.returncode == 2 and "dtype: was 'bf16', now 'fp32'" in again.stderr
    refused = _label(tiny, tiny["root"] / "fp16" / "labels.json", "fp16")
    assert refused.returncode == 2 and "dtype='fp16' is not offered on the CPU" in refused.stderr
