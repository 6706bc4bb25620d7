"""Measures our model's training memory per batch size on a GPU, to confirm (or correct) the
estimate of docs/benchmarks.md ("Training memory on a GPU: an estimate").

Usage (on a machine with a CUDA GPU)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python tools/gpu_memory_check.py \\
        [--size 800x1333] [--batches 1,2,4,8] [--steps 2] [--dn-number 100] [--checkpointing]

It builds the benchmark's Swin-T + BERT-base model (random weights, converted with
``grounding_dino.convert`` as ``tools/benchmark.py`` does; ``--tiny``: a small one), and for
each batch size runs ``--steps`` training steps (forward with the criterion's loss, backward,
AdamW over every parameter) of that many copies of one image with three captioned boxes. It
prints, per batch size, the peak memory the step needed (``torch.cuda.max_memory_allocated``
and ``max_memory_reserved``, after the model and optimizer state) and the seconds per step,
or "out of memory"; then the largest batch that ran, and the per-image slope between the
first two batch sizes that ran.

On a CPU (no GPU, or ``--device cpu``) it runs the same steps and reports the process's peak
resident set size instead, which only grows: use it with ``--tiny`` to check that the script
works, not to measure.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch

from grounding_dino.comparison import reference, training

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="python tools/gpu_memory_check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", default="800x1333", help="image HEIGHTxWIDTH")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=2, help="training steps per batch size")
    parser.add_argument("--dn-number", type=int, default=100, help="denoising queries (0: off)")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing of the enhancer, decoder and Swin layers",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (tests)")
    parser.add_argument("--workdir", default=None, help="keep the models here and reuse them")
    parser.add_argument("--json", default=None, help="also write the results to this new file")
    return parser


def _peak_mb(device: str) -> dict:
    if device.startswith("cuda"):
        return {
            "allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        }
    return {"peak_rss_mb": training.peak_memory_mb()["peak_mb"]}


def _measure(args, out_dir: str, device: str, batch: int) -> dict:
    """One batch size: ``args.steps`` steps; the peak memory and the median seconds per step."""
    size = reference.parse_size(args.size)
    parts = training.CHECKPOINTED_PARTS if args.checkpointing else ()
    rows = {"ours": ("ours", args.dn_number, parts)}
    images = training.make_training_batch(size, batch)
    step = training.build_training_steps(rows, "", out_dir, images, device=device)["ours"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"batch": batch, "seconds_per_step": min(times), **_peak_mb(device)}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        reference.parse_size(args.size)
    except ValueError as error:
        print(
            f"error: --batches must be integers and --size HEIGHTxWIDTH: {error}", file=sys.stderr
        )
        return 1
    if min(batches) < 1 or args.steps < 1:
        print("error: batch sizes and --steps must be at least 1", file=sys.stderr)
        return 1
    if args.json and os.path.exists(args.json):
        print(f"error: --json {args.json} exists; it is not overwritten", file=sys.stderr)
        return 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device}: no CUDA GPU is visible", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    if device == "cpu":
        print("No GPU: the peak is the process's resident set size, which only grows.")
    with (
        contextlib.nullcontext(args.workdir)
        if args.workdir
        else tempfile.TemporaryDirectory(prefix="gdino_memory_")
    ) as workdir:
        os.makedirs(workdir, exist_ok=True)
        _, out_dir = reference.prepare_models(workdir, args.tiny)
        results = []
        for batch in batches:
            try:
                results.append(_measure(args, out_dir, device, batch))
            except torch.cuda.OutOfMemoryError:
                results.append({"batch": batch, "out_of_memory": True})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"Training memory: {'tiny model' if args.tiny else 'Swin-T + BERT-base'}, {args.size}, "
        f"denoising {args.dn_number}, checkpointing {'on' if args.checkpointing else 'off'}, "
        f"{name}"
    )
    key = "allocated_mb" if device.startswith("cuda") else "peak_rss_mb"
    for result in results:
        if result.get("out_of_memory"):
            print(f"batch {result['batch']:>3}: out of memory")
        else:
            print(
                f"batch {result['batch']:>3}: peak {result[key] / 1024:.2f} GiB ({key}), "
                f"{result['seconds_per_step']:.2f} s/step"
            )
    ran = [r for r in results if not r.get("out_of_memory")]
    if ran:
        print(f"Largest batch that ran: {max(r['batch'] for r in ran)}")
    if len(ran) >= 2 and ran[1]["batch"] != ran[0]["batch"]:
        slope = (ran[1][key] - ran[0][key]) / (ran[1]["batch"] - ran[0]["batch"])
        print(f"Per image: {slope / 1024:.2f} GiB (batches {ran[0]['batch']}-{ran[1]['batch']})")
    if args.json:
        with open(args.json, "x") as out:
            json.dump({"device": name, "size": args.size, "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
