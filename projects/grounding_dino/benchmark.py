"""CPU inference benchmark: this project's Grounding DINO against transformers' one.

Usage::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -m grounding_dino.benchmark \\
        [--threads 2] [--runs 5] [--dtype fp32|bf16] [--size 800x1333] [--tiny]

What it does:

1. Builds transformers' ``GroundingDinoForObjectDetection`` with grounding-dino-tiny sizes
   (``GroundingDinoConfig`` defaults: Swin-T, 900 queries, 6 + 6 layers; the text encoder is
   a ``BertConfig()``, bert-base-uncased sizes) and random weights (the model's own
   initialisation plus small noise, see :func:`build_hf_model`), saves it and converts
   it with ``grounding_dino.convert`` in a temporary folder (``--workdir`` keeps and
   reuses them). ``--tiny`` uses a small configuration instead (for tests).
2. Checks that both models give the same token scores (1e-4) and boxes (0.05 px) on the
   same normalised image and caption (see :func:`check_outputs` for near-tied top-k
   scores of the random model).
3. Times both pipelines alternately in this process, end to end from a uint8 BGR image:
   transformers' ``GroundingDinoProcessor`` steps (resize + normalise and tokenise,
   forward, ``post_process_grounded_object_detection``) and our
   :class:`~grounding_dino.predictor.GroundingDINOPredictor` call. One warm-up call each,
   then ``--runs`` timed calls each; the medians and their ratio are printed. Both resize
   with the official rule (shorter side to ``min(size)``, longer side at most
   ``max(size)``), so the ``--size`` image goes through unscaled; 800x1333 is the default.
4. Peak memory: each implementation runs in a child process of its own that loads only
   that model and runs two calls; the child's peak resident set size (``VmHWM`` in
   ``/proc/self/status``: interpreter, libraries, weights and activations) is reported,
   with its resident size after loading the model.

``--dtype bf16`` also times our predictor under ``torch.autocast("cpu", torch.bfloat16)``
and reports its speed-up over our fp32 run and its drift from the fp32 outputs (detections
matched by IoU; this random model amplifies rounding, so the drift is an upper bound).

On a shared machine, read the load average it prints: with more runnable threads than
cores, OpenMP threads wait for each other and 2-thread timings can exceed 1-thread ones.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

__all__ = ["main", "build_hf_model", "HFPipeline", "peak_memory_mb"]

CAPTION = "a cat . a remote control . a person on the left ."
TOKEN_TOL = 1e-4
BOX_TOL_PX = 0.05


# ---------------------------------------------------------------- models
def _hf_config(tiny: bool):
    from transformers import BertConfig, GroundingDinoConfig

    from .testing import tiny_hf_config

    return tiny_hf_config() if tiny else GroundingDinoConfig(text_config=BertConfig())


def build_hf_model(tiny: bool = False, seed: int = 0):
    """
    transformers' Grounding DINO with random weights: its own initialisation plus noise
    (std 0.02), so that no zero-initialised projection makes an op trivial.
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
        from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

        from .text.tokenizer import load_tokenizer, local_bert_dir

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


def _load_ours(out_dir: str, size: Tuple[int, int]):
    from detectron2.config import LazyConfig

    from .predictor import GroundingDINOPredictor
    from .resize import OfficialResize

    predictor = GroundingDINOPredictor(LazyConfig.load(os.path.join(out_dir, "config.yaml")))
    predictor.resize = OfficialResize(min(size), max(size))
    return predictor


def _load_hf(hf_dir: str, size: Tuple[int, int]):
    from transformers import GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection.from_pretrained(hf_dir).eval()
    return HFPipeline(model, size)


def _prepare(workdir: str, tiny: bool) -> Tuple[str, str]:
    """Builds, saves and converts the transformers model; returns (hf_dir, converted_dir)."""
    from .convert.build import convert_checkpoint
    from .text.tokenizer import local_bert_dir

    hf_dir, out_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
    marker = os.path.join(workdir, "tiny" if tiny else "full")
    if os.path.isfile(marker) and os.path.isfile(os.path.join(out_dir, "config.yaml")):
        return hf_dir, out_dir  # built by an earlier run with --workdir
    build_hf_model(tiny).save_pretrained(hf_dir)
    report = convert_checkpoint("hf", hf_dir, out_dir, tokenizer=local_bert_dir())
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


# ---------------------------------------------------------------- checks
def check_outputs(hf: HFPipeline, ours, image_bgr: np.ndarray, caption: str) -> Dict:
    """
    Runs both models on the same normalised image (transformers' preprocessing) and caption.

    The query selection is a top-k over ~22k image tokens: with random weights, two tokens
    can score within fp32 rounding of each other, and then the two implementations may
    order them differently, which gives those queries other content embeddings. The check
    therefore also compares the continuous part before the selection (the enhanced image
    and text features) and counts the ranks where the selected boxes differ: when only the
    order of such near ties differs, it reports that instead of failing.

    Returns:
        dict with ``token_diff`` (max sigmoid difference), ``box_diff_px``,
        ``encoder_diff`` (max difference of the enhanced features) and ``topk_ranks_differ``.

    Raises:
        AssertionError: when the outputs differ by more than 1e-4 / 0.05 px and the
            difference is not explained by a top-k order of equal encoder outputs.
    """
    from .modeling.meta_arch import PromptRun
    from .text import normalize_caption

    inputs = hf.preprocess(image_bgr, caption)
    captured = {}
    hook = ours.model.enhancer.register_forward_hook(
        lambda module, args, output: captured.update(memory=output[0], text=output[1])
    )
    try:
        with torch.no_grad():
            ref = hf.model(**inputs)
            out = ours.model.forward_transformer(
                [inputs["pixel_values"][0]], [PromptRun(0, normalize_caption(caption))]
            )
    finally:
        hook.remove()
    length = inputs["input_ids"].shape[1]
    token_diff = (out["pred_logits"].sigmoid() - ref.logits.sigmoid())[..., :length].abs().max()
    height, width = inputs["pixel_values"].shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    box_diff = ((out["pred_boxes"] - ref.pred_boxes).abs() * scale).max()
    encoder_diff = max(
        float((captured["memory"] - ref.encoder_last_hidden_state_vision).abs().max()),
        float((captured["text"] - ref.encoder_last_hidden_state_text).abs().max()),
    )
    rank_diff = (out["enc_outputs"]["pred_boxes"] - ref.encoder_pred_boxes).abs().amax(-1)
    result = {
        "token_diff": float(token_diff),
        "box_diff_px": float(box_diff),
        "encoder_diff": encoder_diff,
        "topk_ranks_differ": int((rank_diff > 1e-4).sum()),
    }
    if result["token_diff"] < TOKEN_TOL and result["box_diff_px"] < BOX_TOL_PX:
        return result
    if encoder_diff < TOKEN_TOL and result["topk_ranks_differ"] > 0:
        return result  # equal up to the order of near-tied top-k scores (see above)
    raise AssertionError(f"outputs differ: {result}")


def _report_check(check: Dict) -> None:
    print(
        f"Enhanced features equal: max diff {check['encoder_diff']:.2e}; final outputs: max "
        f"token score diff {check['token_diff']:.2e}, max box diff {check['box_diff_px']:.2e} px"
    )
    if check["topk_ranks_differ"]:
        print(
            f"Note: the query selection ordered {check['topk_ranks_differ']} of its top-k "
            "ranks differently (scores tied within fp32 rounding in this random model), so "
            "the final outputs are not compared query by query"
        )
    else:
        print("Outputs equal (token scores 1e-4, boxes 0.05 px)")


def _drift(fp32: Dict, other: Dict) -> Dict[str, float]:
    """
    How far one predictor output is from the fp32 one: each fp32 detection is matched to
    the other output's box of highest IoU.

    Returns:
        detection counts, the fraction of fp32 detections matched at IoU >= 0.9, the mean
        IoU of the matches and the largest score difference among the matched pairs.
    """
    from detectron2.structures import pairwise_iou

    a, b = fp32["instances"], other["instances"]
    result = {"detections_fp32": len(a), "detections_other": len(b)}
    if len(a) and len(b):
        iou, match = pairwise_iou(a.pred_boxes, b.pred_boxes).max(1)
        good = iou >= 0.9
        result["matched_iou0.9"] = round(float(good.float().mean()), 4)
        result["mean_iou"] = round(float(iou.mean()), 4)
        if good.any():
            diff = (a.scores[good] - b.scores[match[good]].float()).abs().max()
            result["max_score_diff"] = round(float(diff), 5)
    return result


# ---------------------------------------------------------------- timing and memory
def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_mb() -> Dict[str, float]:
    """This process's current and peak resident set size (``VmRSS``, ``VmHWM``) in MB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount = line.split(":")
                values[key] = int(amount.split()[0]) / 1024.0
    return {"rss_mb": values.get("VmRSS", float("nan")), "peak_mb": values.get("VmHWM", 0.0)}


def _memory_child(args) -> None:
    """Child process: loads one implementation, runs two calls, prints its memory as JSON."""
    torch.set_num_threads(args.threads)
    image = _image(args.size)
    if args.memory_child == "hf":
        pipeline = _load_hf(args.hf_dir, _parse_size(args.size))
    else:
        pipeline = _load_ours(args.out_dir, _parse_size(args.size))
    loaded = peak_memory_mb()["rss_mb"]
    for _ in range(2):
        pipeline(image, CAPTION)
    print(json.dumps({"loaded_mb": loaded, **peak_memory_mb()}))


def _measure_memory(kind: str, args, hf_dir: str, out_dir: str) -> Dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "grounding_dino.benchmark",
        "--memory-child",
        kind,
        "--hf-dir",
        hf_dir,
        "--out-dir",
        out_dir,
        "--threads",
        str(args.threads),
        "--size",
        args.size,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory child for {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _image(size: str) -> np.ndarray:
    """A deterministic uint8 BGR image: smooth gradients plus noise."""
    height, width = _parse_size(size)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 200
    noise = rng.normal(0, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _parse_size(size: str) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH, e.g. 800x1333, got {size!r}") from None
    if min(height, width) < 64:
        raise ValueError(f"--size {size}: each side must be at least 64 pixels")
    return height, width


# ---------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both models)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each pipeline")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size", default="800x1333", help="image HEIGHTxWIDTH")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (tests)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument(
        "--workdir", default=None, help="keep the models here and reuse them (default: temp)"
    )
    # Internal: the per-implementation memory child.
    parser.add_argument("--memory-child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    return parser


def run_benchmark(args, workdir: str) -> Dict:
    """Builds, checks, times and measures; returns the numbers printed by :func:`main`."""
    torch.set_num_threads(args.threads)
    image = _image(args.size)
    print(f"Building and converting the {'tiny' if args.tiny else 'Swin-T + BERT-base'} model")
    hf_dir, out_dir = _prepare(workdir, args.tiny)
    size = _parse_size(args.size)
    hf, ours = _load_hf(hf_dir, size), _load_ours(out_dir, size)
    check = check_outputs(hf, ours, image, CAPTION)
    _report_check(check)

    pipelines: Dict[str, Callable[[], object]] = {
        "transformers": lambda: hf(image, CAPTION),
        "ours": lambda: ours(image, CAPTION),
    }
    if args.dtype == "bf16":

        def ours_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ours(image, CAPTION)

        pipelines["ours bf16"] = ours_bf16
    times: Dict[str, List[float]] = {name: [] for name in pipelines}
    loads = [_load_average()]
    for function in pipelines.values():  # warm-up
        function()
    for _ in range(args.runs):
        for name, function in pipelines.items():
            times[name].append(_timed(function))
        loads.append(_load_average())
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "check": check,
        "times": times,
        "medians": medians,
        "ratio": medians["transformers"] / medians["ours"],
        "load_average": loads,
    }
    if args.dtype == "bf16":
        result["bf16_speedup"] = medians["ours"] / medians["ours bf16"]
        result["bf16_vs_transformers"] = medians["transformers"] / medians["ours bf16"]
        result["bf16_drift"] = _drift(pipelines["ours"](), pipelines["ours bf16"]())
    if not args.no_memory:
        del hf, ours
        result["memory"] = {
            name: _measure_memory(kind, args, hf_dir, out_dir)
            for name, kind in (("transformers", "hf"), ("ours", "ours"))
        }
    return result


def _report(args, result: Dict) -> None:
    print()
    print(
        f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads, image {args.size}, "
        f"{args.runs} runs (medians); load average during runs: "
        f"{result['load_average'][0]} -> {result['load_average'][-1]}"
    )
    memory = result.get("memory", {})
    print(f"{'implementation':<16}{'median s':>10}{'runs (s)':>40}{'peak RSS MB':>14}")
    for name, median in result["medians"].items():
        runs = ", ".join(f"{t:.2f}" for t in result["times"][name])
        peak = memory.get(name.split()[0], {}).get("peak_mb") if name != "ours bf16" else None
        peak_text = f"{peak:.0f}" if peak else "-"
        print(f"{name:<16}{median:>10.3f}{runs:>40}{peak_text:>14}")
    print(f"Speed-up of ours over transformers (fp32): {result['ratio']:.2f}x")
    if "bf16_speedup" in result:
        print(
            f"bf16 autocast: {result['bf16_speedup']:.2f}x over our fp32, "
            f"{result['bf16_vs_transformers']:.2f}x over transformers; drift vs fp32: "
            f"{result['bf16_drift']}"
        )
    for name, values in memory.items():
        print(
            f"Memory {name}: peak RSS {values['peak_mb']:.0f} MB (after loading "
            f"{values['loaded_mb']:.0f} MB), a child process running only this model"
        )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads < 1 or args.runs < 1:
        print("error: --threads and --runs must be at least 1", file=sys.stderr)
        return 1
    try:
        _parse_size(args.size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.memory_child:
        _memory_child(args)
        return 0
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        context = contextlib.nullcontext(args.workdir)
    else:
        context = tempfile.TemporaryDirectory(prefix="gdino_benchmark_")
    with context as workdir:
        result = run_benchmark(args, workdir)
    _report(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
