"""
Accuracy and wall time of a trained Grounding DINO in each precision mode
(:mod:`grounding_dino.precision`), evaluated with the project's evaluators, as ``train_net.py
--eval-only`` evaluates (no score threshold, the top 300 detections per image).

Usage::

    python tools/evaluate_precision.py --weights output/demo/model_final.pth
    python tools/evaluate_precision.py --weights W --modes fp32,bf16 --max-images 50 \\
        --datasets shapes_val,shapes_rec_val --threads 1

The config is ``--config-file``, else the ``config.yaml`` next to ``--weights`` (what ``make
demo`` writes), else the packaged ``shapes_tiny.py``. A config with a ``shapes`` entry (the
demo's) gets its synthetic datasets registered under ``<weights folder>/shapes``
(``--shapes-root``), as ``tools/demo_job.py`` does. Default datasets: ``shapes_val`` (COCO AP,
AP50) and ``shapes_rec_val`` (REC Acc@0.5). ``--max-images N`` evaluates the first N records
of each dataset (images; for REC, expressions), the detection AP then over those images only.

Every mode runs the same model and loader; the first mode is the reference. It prints a
markdown table (one row per mode: the metrics, the change from the reference, seconds per
dataset) and writes it as JSON (``--output``, default ``<weights folder>/precision.json``).
A mode whose detection AP or REC accuracy is more than ``--max-loss`` (1.0) point below the
reference's is labelled ``LOSES > 1.0``.
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog

from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.evaluation.precision_modes import evaluate_modes, label_losses, markdown_table
from grounding_dino.io.atomic import atomic_file, refuse_existing
from grounding_dino.model_zoo import build_model, get_config
from grounding_dino.precision import (
    PRECISIONS,
    check_precision,
    cpu_has_native_bf16,
    emulated_bf16_allowed,
)
from grounding_dino.shapes_demo import default_config_file

__all__ = ["main", "parse_args", "load_config"]

DEFAULT_DATASETS = ("shapes_val", "shapes_rec_val")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/evaluate_precision.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="the trained checkpoint (.pth)")
    parser.add_argument("--config-file", default=None, help="default: see above")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated modes of {PRECISIONS}, the first is the reference "
        "(default: fp32 and every other mode offered on the device)",
    )
    parser.add_argument(
        "--datasets", default=",".join(DEFAULT_DATASETS), help="comma-separated dataset names"
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="first N records of each dataset"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes-root", default=None, help="default: <weights folder>/shapes")
    parser.add_argument("--output", default=None, help="JSON file (default: see above)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--max-loss", type=float, default=1.0, help="label modes losing more points than this"
    )
    parser.add_argument(
        "--allow-emulated-bf16",
        action="store_true",
        help="measure bf16 on a CPU without native bfloat16 (emulated: tens of times slower "
        "than fp32); without it such a CPU leaves bf16 out of the default modes and refuses it "
        "in --modes",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.modes is None:
        args.modes = [m for m in PRECISIONS if args.device != "cpu" or m != "fp16"]
        emulated = args.device == "cpu" and not cpu_has_native_bf16()
        if emulated and not emulated_bf16_allowed(args.allow_emulated_bf16):
            args.modes.remove("bf16")
            print(
                "--modes: bf16 left out: this CPU has no native bfloat16 (emulated bf16 is tens "
                "of times slower than fp32); --allow-emulated-bf16 measures it anyway",
                flush=True,
            )
    else:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        for mode in args.modes:
            check_precision(mode, args.device, allow_emulated_bf16=args.allow_emulated_bf16)
    except ValueError as error:
        parser.error(f"--modes: {error}")
    if len(set(args.modes)) != len(args.modes) or not args.modes:
        parser.error(f"--modes {args.modes}: give each mode once")
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    return args


def load_config(args: argparse.Namespace):
    """The config (see the module docstring) with the overrides, its datasets registered."""
    folder = os.path.dirname(os.path.abspath(args.weights))
    config_file = args.config_file
    if config_file is None:
        beside = os.path.join(folder, "config.yaml")
        config_file = beside if os.path.isfile(beside) else default_config_file()
    cfg = get_config(config_file, list(args.opts or []))
    cfg.train.device = args.device
    if "shapes" in cfg:
        root = args.shapes_root or os.path.join(folder, "shapes")
        register_shapes_datasets(root=root, **dict(cfg.shapes))
    for name in args.datasets:
        if name not in DatasetCatalog.list():
            raise SystemExit(f"--datasets: {name} is not registered (config {config_file})")
    return cfg, config_file


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "precision.json")
    try:  # before the evaluation: a result is never written over
        refuse_existing([args.output], force=args.force, what="--output")
    except FileExistsError as error:
        raise SystemExit(str(error)) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        cfg, config_file = load_config(args)
        model = build_model(cfg, args.weights, args.device)
        output_dir = os.path.join(os.path.dirname(args.output), "precision")
        results = evaluate_modes(
            cfg, model, args.modes, args.datasets, output_dir, max_images=args.max_images
        )
    finally:
        torch.set_num_threads(threads)
    losses = label_losses(results, args.max_loss)
    table = markdown_table(results, losses, args.max_loss)
    results.update(
        weights=args.weights,
        config_file=config_file,
        device=args.device,
        threads=args.threads,
        max_images=args.max_images,
        losses=losses,
        table=table,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_file(args.output, replace=args.force) as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"Wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
