"""
The two pipelines that ``tools/benchmark.py`` compares and times: transformers' Grounding DINO
(the reference, with random weights) and this project's predictor on the converted weights
(and its ONNX Runtime export), plus the benchmark's input image.
"""

import os
from typing import Dict, Tuple

import numpy as np
import torch

__all__ = [
    "HFPipeline",
    "build_hf_model",
    "export_onnx_model",
    "load_hf",
    "load_onnx",
    "load_ours",
    "make_image",
    "parse_size",
    "prepare_models",
]


def _hf_config(tiny: bool):
    from transformers import BertConfig, GroundingDinoConfig

    from ..testing import tiny_hf_config

    return tiny_hf_config() if tiny else GroundingDinoConfig(text_config=BertConfig())


def build_hf_model(tiny: bool = False, seed: int = 0):
    """
    transformers' Grounding DINO with random weights: its own initialisation plus noise
    (std 0.02), so that no zero-initialised projection makes an op trivial.

    Args:
        tiny: a small configuration (``grounding_dino.testing.tiny_hf_config``) instead of
            grounding-dino-tiny's sizes (Swin-T, BERT-base, 900 queries, 6 + 6 layers).
        seed: seed of the initialisation and of the noise.
    """
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(_hf_config(tiny)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        # Keep the query selector's zero bias: otherwise every token whose proposal is
        # invalid (memory zeroed) scores LayerNorm(bias) . text alike, and such ties fill the
        # top-k with saturated boxes, where transformers (logit eps 1e-5) and the official
        # code (eps 1e-3) differ by design.
        model.model.enc_output.bias.zero_()
    return model


class HFPipeline:
    """transformers' inference steps, as ``GroundingDinoProcessor`` does them, offline."""

    def __init__(
        self,
        model,
        size: Tuple[int, int] = (800, 1333),
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
    ):
        """
        Args:
            model: a ``GroundingDinoForObjectDetection`` in eval mode.
            size: (shorter side, longest side) of the official resize.
            box_threshold, text_threshold: of ``post_process_grounded_object_detection``.
        """
        from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

        from ..text.tokenizer import load_tokenizer, local_bert_dir

        self.model = model
        self.processor = GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessor(
                size={"shortest_edge": min(size), "longest_edge": max(size)}
            ),
            tokenizer=load_tokenizer(local_bert_dir()),
        )
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    def preprocess(self, image_bgr: np.ndarray, caption: str):
        """The processor's ``pixel_values`` [1, 3, H, W], ``input_ids`` [1, L] and masks."""
        return self.processor(images=image_bgr[:, :, ::-1], text=caption, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray, caption: str) -> Dict:
        inputs = self.preprocess(image_bgr, caption)
        outputs = self.model(**inputs)
        return self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[image_bgr.shape[:2]],
        )[0]


def load_ours(out_dir: str, size: Tuple[int, int]):
    """The project's predictor on a converted model (``config.yaml`` + weights in ``out_dir``)."""
    from ..model_zoo import get_config
    from ..predictor import GroundingDINOPredictor
    from ..resize import OfficialResize

    predictor = GroundingDINOPredictor(get_config(os.path.join(out_dir, "config.yaml")))
    predictor.resize = OfficialResize(min(size), max(size))
    return predictor


def export_onnx_model(workdir: str, out_dir: str) -> Dict:
    """
    Exports the converted model in ``out_dir`` to ``workdir/model.onnx`` with
    ``python -m grounding_dino.export onnx`` (reused when an earlier run left it there).

    Returns:
        ``{"path", "seconds" (None when reused), "bytes"}``.

    Raises:
        RuntimeError: the export failed (its output attached).
    """
    import subprocess
    import sys
    import time

    path = os.path.join(workdir, "model.onnx")
    seconds = None
    if not os.path.isfile(path):
        start = time.perf_counter()
        command = [sys.executable, "-m", "grounding_dino.export", "onnx"]
        result = subprocess.run(
            command + [os.path.join(out_dir, "config.yaml"), path], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"ONNX export failed:\n{result.stdout}\n{result.stderr[-3000:]}")
        seconds = time.perf_counter() - start
    return {"path": path, "seconds": seconds, "bytes": os.path.getsize(path)}


def load_onnx(onnx_path: str, out_dir: str, size: Tuple[int, int], threads: int):
    """``OnnxPredictor`` on an exported model, ``threads`` ONNX Runtime intra-op threads."""
    from ..deploy import OnnxPredictor
    from ..resize import OfficialResize

    predictor = OnnxPredictor(onnx_path, os.path.join(out_dir, "config.yaml"), threads=threads)
    predictor.resize = OfficialResize(min(size), max(size))
    return predictor


def load_hf(hf_dir: str, size: Tuple[int, int]) -> HFPipeline:
    """transformers' pipeline on a saved model."""
    from transformers import GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection.from_pretrained(hf_dir).eval()
    return HFPipeline(model, size)


def prepare_models(workdir: str, tiny: bool) -> Tuple[str, str]:
    """
    Builds and saves transformers' model and converts it with ``grounding_dino.convert``;
    reuses both when an earlier run left them in ``workdir`` (same ``tiny``).

    Returns:
        (folder of the transformers model, folder of the converted model).

    Raises:
        RuntimeError: the conversion left missing or unexpected keys.
    """
    from ..convert.build import convert_checkpoint
    from ..text.tokenizer import local_bert_dir

    hf_dir, out_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
    marker = os.path.join(workdir, "tiny" if tiny else "full")
    if os.path.isfile(marker) and os.path.isfile(os.path.join(out_dir, "config.yaml")):
        return hf_dir, out_dir  # built by an earlier run with --workdir
    build_hf_model(tiny).save_pretrained(hf_dir)
    # The workdir is this tool's own: a model of the other size from an earlier run is replaced.
    report = convert_checkpoint("hf", hf_dir, out_dir, tokenizer=local_bert_dir(), force=True)
    if report["missing"] or report["unexpected"]:
        raise RuntimeError(
            f"conversion left missing keys {report['missing']} and unexpected keys "
            f"{report['unexpected']}"
        )
    for name in ("tiny", "full"):
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    open(marker, "w").close()
    return hf_dir, out_dir


def make_image(size: str) -> np.ndarray:
    """A deterministic uint8 BGR image of ``size`` (HEIGHTxWIDTH): gradients plus noise."""
    height, width = parse_size(size)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 200
    noise = rng.normal(0, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def parse_size(size: str) -> Tuple[int, int]:
    """``"800x1333"`` -> (800, 1333); ValueError naming the bad value otherwise."""
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH, e.g. 800x1333, got {size!r}") from None
    if min(height, width) < 64:
        raise ValueError(f"--size {size}: each side must be at least 64 pixels")
    return height, width
