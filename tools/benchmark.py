"""CPU inference and training benchmark: this project's Grounding DINO against transformers'.

Usage::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python tools/benchmark.py \\
        [--threads 2] [--runs 5] [--dtype fp32|bf16] [--size 800x1333] [--tiny]
    python tools/benchmark.py --train [--batch 1] [--steps 3] [--size 800x1333] [--rows ...] \\
        [--glibc-defaults] [--dtype fp32|bf16]

``--train`` times training steps instead (forward with the loss, backward, AdamW over every
parameter) of transformers' model with ``labels`` and ours with its criterion, denoising off
(like for like) and on, on the same converted weights, image, caption and three boxes; rows
alternate step by step in this process (wall and CPU time of every step), and each row's
peak RSS is measured in a child process of its own (see ``grounding_dino.comparison.training``).
All of these processes run every row under the same ``malloc`` settings: ``train_net.py``'s
CPU training ones, or glibc's defaults with ``--glibc-defaults``.

What it does:

1. Builds transformers' ``GroundingDinoForObjectDetection`` with grounding-dino-tiny sizes
   (``GroundingDinoConfig`` defaults: Swin-T, 900 queries, 6 + 6 layers; the text encoder is
   a ``BertConfig()``, bert-base-uncased sizes) and random weights (the model's own
   initialisation plus small noise, see ``build_hf_model`` in
   ``grounding_dino.comparison.reference``), saves it and converts it with
   ``grounding_dino.convert`` in a temporary folder (``--workdir`` keeps and reuses them).
   ``--tiny`` uses a small configuration instead (for tests).
2. Checks that both models give the same token scores (1e-4) and boxes (0.05 px) for
   every query on the same image and caption (see ``check_outputs`` in
   ``grounding_dino.comparison.checks`` for near-tied top-k scores of the random model).
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

``--backend onnxruntime`` also exports our model with ``python -m grounding_dino.export onnx``
(once per ``--workdir``) and times :class:`~grounding_dino.deploy.OnnxPredictor` in the same
loop, its session on ``--threads`` intra-op threads; its detections are compared with ours.

``--dtype bf16`` also times our predictor under ``torch.autocast("cpu", torch.bfloat16)``
and reports its speed-up over our fp32 run and its drift from the fp32 outputs (detections
matched by IoU; this random model amplifies rounding, so the drift is an upper bound). With
``--train`` it runs every row's forward and loss under that autocast instead (the backward
outside it, the weights and AdamW in fp32), as ``train.amp`` does on the CPU.

On a shared machine, read the load average it prints: with more runnable threads than
cores, OpenMP threads wait for each other and 2-thread timings can exceed 1-thread ones.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

from grounding_dino.comparison import checks, reference, training, training_run
from grounding_dino.comparison.reference import (
    load_hf,
    load_onnx,
    load_ours,
    make_image,
    parse_size,
)
from grounding_dino.comparison.training import load_average, peak_memory_mb
from grounding_dino.precision import cpu_has_native_bf16, cpu_model_name, precision_context

__all__ = ["main", "run_benchmark", "peak_memory_mb"]

CAPTION = "a cat . a remote control . a person on the left ."


# ---------------------------------------------------------------- timing and memory
def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _memory_child(args) -> None:
    """Child process: loads one implementation, runs two calls (``--train``: ``--steps`` timed
    training steps of row ``--row`` and one sampled for memory), prints its memory as JSON."""
    torch.set_num_threads(args.threads)
    if args.memory_child == "train":
        training.use_allocator(args.glibc_defaults)
        memory = training.training_memory_child(
            args.row,
            args.hf_dir,
            args.out_dir,
            parse_size(args.size),
            args.batch,
            args.steps,
            args.dtype,
        )
        print(json.dumps(memory))
        return
    image = make_image(args.size)
    if args.memory_child == "hf":
        pipeline = load_hf(args.hf_dir, parse_size(args.size))
    elif args.memory_child == "onnxruntime":
        pipeline = load_onnx(args.onnx, args.out_dir, parse_size(args.size), args.threads)
    else:
        pipeline = load_ours(args.out_dir, parse_size(args.size))
    loaded = peak_memory_mb()["rss_mb"]
    for _ in range(2):
        pipeline(image, CAPTION)
    print(json.dumps({"loaded_mb": loaded, **peak_memory_mb()}))


def _child_timed_steps(args) -> int:
    """Timed steps of a training memory child: the row's steps with ``--rows-apart`` (at least
    2: the median leaves out the first), else 1 (the optimizer's state, before the sampled
    step)."""
    return max(2, args.steps) if args.rows_apart else 1


def _measure_memory(
    kind: str, args, hf_dir: str, out_dir: str, onnx="", row=""
) -> Dict[str, float]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
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
        "--onnx",
        onnx,
        "--batch",
        str(args.batch),
        "--steps",
        str(_child_timed_steps(args)),
        "--row",
        row,
        "--dtype",
        args.dtype,
    ] + (["--glibc-defaults"] if args.glibc_defaults else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory child for {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both models)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each pipeline")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: also time our predictor under bf16 autocast; with --train, every row's "
        "forward and loss under it",
    )
    parser.add_argument("--size", default="800x1333", help="image HEIGHTxWIDTH")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (tests)")
    parser.add_argument(
        "--backend",
        choices=["onnxruntime"],
        action="append",
        default=[],
        help="also time this runtime on our exported model (same threads)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument(
        "--train",
        action="store_true",
        help="time and measure training steps instead of inference (see docs/benchmarks.md)",
    )
    parser.add_argument("--batch", type=int, default=1, help="--train: images per step")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="--train: timed steps of each row (the first is "
        "left out of the median; the memory children run max(2, steps))",
    )
    parser.add_argument(
        "--rows",
        default="transformers,ours (dn off),ours (dn on)",
        help=f"--train: comma-separated rows, of: {', '.join(training.ROWS)}",
    )
    parser.add_argument(
        "--rows-apart",
        action="store_true",
        help="--train: time each row alone in its own process, one after the other (where the "
        "rows do not fit one process; default: alternating step by step in one process)",
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="--train: leave malloc at glibc's defaults in every process (default: "
        "train_net.py's CPU settings, grounding_dino.engine.cpu_allocator, for every row)",
    )
    parser.add_argument(
        "--workdir", default=None, help="keep the models here and reuse them (default: temp)"
    )
    # Internal: the per-implementation memory child.
    parser.add_argument(
        "--memory-child", choices=["hf", "ours", "onnxruntime", "train"], help=argparse.SUPPRESS
    )
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default="", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    return parser


def run_benchmark(args, workdir: str) -> Dict:
    """Builds, checks, times and measures; returns the numbers printed by :func:`main`."""
    torch.set_num_threads(args.threads)
    image = make_image(args.size)
    print(f"Building and converting the {'tiny' if args.tiny else 'Swin-T + BERT-base'} model")
    hf_dir, out_dir = reference.prepare_models(workdir, args.tiny)
    size = parse_size(args.size)
    hf, ours = load_hf(hf_dir, size), load_ours(out_dir, size)
    check = checks.check_outputs(hf, ours, image, CAPTION)
    print(checks.format_check(check))

    pipelines: Dict[str, Callable[[], object]] = {
        "transformers": lambda: hf(image, CAPTION),
        "ours": lambda: ours(image, CAPTION),
    }
    onnx = None
    if "onnxruntime" in args.backend:
        onnx = reference.export_onnx_model(workdir, out_dir)
        runtime = load_onnx(onnx["path"], out_dir, size, args.threads)
        onnx["check"] = checks.compare_detections(ours(image, CAPTION), runtime(image, CAPTION))
        print(f"onnxruntime vs ours: {onnx['check']}")
        pipelines["onnxruntime"] = lambda: runtime(image, CAPTION)
    if args.dtype == "bf16":

        def ours_bf16():
            with precision_context("bf16", "cpu"):
                return ours(image, CAPTION)

        pipelines["ours bf16"] = ours_bf16
    times: Dict[str, List[float]] = {name: [] for name in pipelines}
    loads = [load_average()]
    for function in pipelines.values():  # warm-up
        function()
    for _ in range(args.runs):
        for name, function in pipelines.items():
            times[name].append(_timed(function))
        loads.append(load_average())
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "check": check,
        "times": times,
        "medians": medians,
        "ratio": medians["transformers"] / medians["ours"],
        "load_average": loads,
    }
    if onnx is not None:
        result["onnx"] = onnx
    if args.dtype == "bf16":
        result["bf16_speedup"] = medians["ours"] / medians["ours bf16"]
        result["bf16_vs_transformers"] = medians["transformers"] / medians["ours bf16"]
        result["bf16_drift"] = checks.drift(pipelines["ours"](), pipelines["ours bf16"]())
    if not args.no_memory:
        del hf, ours
        kinds = [("transformers", "hf"), ("ours", "ours")]
        if onnx is not None:
            kinds.append(("onnxruntime", "onnxruntime"))
        result["memory"] = {
            name: _measure_memory(kind, args, hf_dir, out_dir, onnx["path"] if onnx else "")
            for name, kind in kinds
        }
    return result


def _report(args, result: Dict) -> None:
    print()
    print(
        f"Machine: {cpu_model_name()}, {os.cpu_count()} CPUs, "
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
    if "onnx" in result:
        onnx = result["onnx"]
        seconds = "reused" if onnx["seconds"] is None else f"{onnx['seconds']:.1f} s"
        print(
            f"ONNX: {onnx['path']} ({onnx['bytes'] / 2**20:.1f} MiB, export {seconds}); "
            f"speed-up of onnxruntime over ours: "
            f"{result['medians']['ours'] / result['medians']['onnxruntime']:.2f}x"
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
    if args.batch < 1 or args.steps < 1:
        print("error: --batch and --steps must be at least 1", file=sys.stderr)
        return 1
    if args.rows_apart and (args.no_memory or not args.train):
        print(
            "error: --rows-apart times --train rows in their memory processes: it needs --train "
            "and cannot be combined with --no-memory",
            file=sys.stderr,
        )
        return 1
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in training.ROWS]
    if args.train and (unknown or not rows):
        print(
            f"error: --rows {args.rows!r}: unknown rows {unknown}; rows: {list(training.ROWS)}",
            file=sys.stderr,
        )
        return 1
    try:
        parse_size(args.size)
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
        if args.train:
            return _train_benchmark(args, workdir, rows)
        result = run_benchmark(args, workdir)
    _report(args, result)
    return 0


def _train_benchmark(args, workdir: str, rows) -> int:
    """``--train``: the training rows' seconds per step and peak memory, printed as a table."""
    torch.set_num_threads(args.threads)
    allocator = training.use_allocator(args.glibc_defaults)
    print(f"Building and converting the {'tiny' if args.tiny else 'Swin-T + BERT-base'} model")
    hf_dir, out_dir = reference.prepare_models(workdir, args.tiny)
    size = parse_size(args.size)

    def measure(row):
        return _measure_memory("train", args, hf_dir, out_dir, row=row)

    result = training_run.run_training_benchmark(
        rows,
        hf_dir,
        out_dir,
        size,
        args.batch,
        args.steps,
        None if args.no_memory else measure,
        apart=args.rows_apart,
        precision=args.dtype,
    )
    steps = _child_timed_steps(args) if args.rows_apart else args.steps
    precision = "fp32"
    if args.dtype == "bf16":
        precision = "forward and loss in bf16 autocast (as train.amp on the CPU), fp32 weights"
        if not cpu_has_native_bf16():
            precision += " (emulated: this CPU has no native bfloat16, expect it far slower)"
    order = (
        "each row alone in its own process, then one step for its memory"
        if args.rows_apart
        else "alternating"
    )
    header = (
        f"Training: {cpu_model_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, {'tiny model' if args.tiny else 'Swin-T + BERT-base'}, "
        f"batch {args.batch} of {args.size}, {steps} steps per row ({order}), "
        f"forward + loss + backward + AdamW, {precision}; {allocator} (every row)"
    )
    print(training_run.format_training_report(result, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
