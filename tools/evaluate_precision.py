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
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluator

from grounding_dino.checkpoint import GroundingDINOCheckpointer
from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.engine import evaluate as evaluate_model
from grounding_dino.evaluation import build_evaluator
from grounding_dino.precision import (
    PRECISIONS,
    check_precision,
    outputs_to_fp32,
    precision_context,
)

# Modules next to this script (python puts the script's folder first on sys.path).
from demo_job import default_config_file

__all__ = ["main", "parse_args", "evaluate_modes", "markdown_table"]

DEFAULT_DATASETS = ("shapes_val", "shapes_rec_val")
# The headline metrics of each evaluator's results: (results key, metric names).
METRICS = {"bbox": ("AP", "AP50"), "rec": ("Acc@0.5",)}


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
    parser.add_argument(
        "--max-loss", type=float, default=1.0, help="label modes losing more points than this"
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
    else:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        for mode in args.modes:
            check_precision(mode, args.device)
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
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(args.opts or []))
    cfg.train.device = args.device
    if "shapes" in cfg:
        root = args.shapes_root or os.path.join(folder, "shapes")
        register_shapes_datasets(root=root, **dict(cfg.shapes))
    for name in args.datasets:
        if name not in DatasetCatalog.list():
            raise SystemExit(f"--datasets: {name} is not registered (config {config_file})")
    return cfg, config_file


class _FirstImages(DatasetEvaluator):
    """An evaluator scoring only the images it was given (COCO AP over a subset)."""

    def __init__(self, evaluator: DatasetEvaluator):
        self.evaluator, self.image_ids = evaluator, []

    def reset(self):
        self.evaluator.reset()
        self.image_ids = []

    def process(self, inputs, outputs):
        self.image_ids.extend(i["image_id"] for i in inputs)
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        if hasattr(self.evaluator, "_eval_predictions"):  # detectron2's COCOEvaluator
            return self.evaluator.evaluate(img_ids=sorted(set(self.image_ids)))
        return self.evaluator.evaluate()


def _loader(cfg, dataset: str, max_images: Optional[int]):
    cfg.dataloader.test.dataset.names = dataset
    dicts = instantiate(cfg.dataloader.test.dataset)
    if max_images is not None:
        dicts = dicts[:max_images]
    return build_detection_test_loader(
        dataset=dicts,
        mapper=instantiate(cfg.dataloader.test.mapper),
        batch_size=int(cfg.dataloader.test.get("batch_size", 1)),
        num_workers=0,
    )


def _headline(results: Dict) -> Dict[str, Optional[float]]:
    metrics = {}
    for key, names in METRICS.items():
        for name in names:
            if key in results and name in results[key]:
                value = float(results[key][name])
                metrics[name] = value if math.isfinite(value) else None
    if not metrics:
        raise KeyError(f"The evaluator returned {sorted(results)}, none of {sorted(METRICS)}")
    return metrics


def evaluate_modes(cfg, model, modes: List[str], datasets: List[str], args) -> Dict:
    """
    Evaluates ``model`` on each dataset in each mode.

    Returns:
        ``{"modes": {mode: {dataset: {metric: value, "seconds": s}}}, "images": {dataset: n}}``
        (``n``: the records evaluated: images, or expressions for REC).
    """
    device = model.device
    results: Dict = {"modes": {}, "images": {}}
    for mode in modes:
        # The predictor's contract in every mode: float32 outputs.
        hook = model.register_forward_hook(lambda module, inputs, outputs: outputs_to_fp32(outputs))
        try:
            per_dataset = {}
            for dataset in datasets:
                loader = _loader(cfg, dataset, args.max_images)
                results["images"][dataset] = len(loader.dataset)
                output_dir = os.path.join(os.path.dirname(args.output), "precision", mode, dataset)
                evaluator = _FirstImages(build_evaluator(dataset, output_dir=output_dir))
                start = time.perf_counter()
                with precision_context(mode, device):
                    out = evaluate_model(model, loader, evaluator)
                seconds = time.perf_counter() - start
                per_dataset[dataset] = {**_headline(out), "seconds": round(seconds, 2)}
                print(f"[{mode}] {dataset}: {per_dataset[dataset]}", flush=True)
            results["modes"][mode] = per_dataset
        finally:
            hook.remove()
    return results


def label_losses(results: Dict, max_loss: float) -> Dict[str, List[str]]:
    """Per mode, ``"<dataset> <metric> -x.xx"`` for each headline metric (AP, Acc@0.5) more
    than ``max_loss`` points below the first (reference) mode's."""
    modes = list(results["modes"])
    reference = results["modes"][modes[0]]
    losses = {}
    for mode in modes:
        found = []
        for dataset, metrics in results["modes"][mode].items():
            for name in ("AP", "Acc@0.5"):
                base, value = reference[dataset].get(name), metrics.get(name)
                if base is not None and value is not None and base - value > max_loss:
                    found.append(f"{dataset} {name} {value - base:+.2f}")
        losses[mode] = found
    return losses


def markdown_table(results: Dict, losses: Dict[str, List[str]], max_loss: float) -> str:
    """One row per mode: each dataset's metrics (change from the reference) and seconds."""
    modes = list(results["modes"])
    reference = results["modes"][modes[0]]
    datasets = list(reference)
    header = ["mode"]
    for dataset in datasets:
        names = [n for n in reference[dataset] if n != "seconds"]
        header += [f"{dataset} {n}" for n in names] + [f"{dataset} s"]
    header.append("note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in modes:
        row = [mode]
        for dataset in datasets:
            metrics = results["modes"][mode][dataset]
            for name in (n for n in reference[dataset] if n != "seconds"):
                value, base = metrics.get(name), reference[dataset].get(name)
                if value is None:
                    row.append("n/a")
                elif mode == modes[0] or base is None:
                    row.append(f"{value:.2f}")
                else:
                    row.append(f"{value:.2f} ({value - base:+.2f})")
            row.append(f"{metrics['seconds']:.1f}")
        note = f"LOSES > {max_loss:g}: " + ", ".join(losses[mode]) if losses[mode] else ""
        row.append("reference" if mode == modes[0] else note)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "precision.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        cfg, config_file = load_config(args)
        model = instantiate(cfg.model).to(args.device).eval()
        GroundingDINOCheckpointer(model).load(args.weights)
        results = evaluate_modes(cfg, model, args.modes, args.datasets, args)
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
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"Wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
