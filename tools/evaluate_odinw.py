#!/usr/bin/env python
"""
Zero-shot evaluation of a Grounding DINO model on an ODinW suite (ODinW-13 or ODinW-35): COCO
AP on each dataset, prompted with the dataset's own category names, and the average AP over
the datasets (the number GLIP and Grounding DINO report).

The datasets are read from ``--root`` in GLIP's layout (see ``datasets/README.md``); missing
ones are listed and the average says over how many datasets it was taken. Examples::

    python tools/evaluate_odinw.py --config-file configs/zeroshot_coco_swin_t.py \\
        --weights weights/swin_t/model.pth --root datasets/odinw --suite odinw13
    python tools/evaluate_odinw.py --config-file configs/zeroshot_coco_swin_t.py \\
        --weights weights/swin_t/model.pth --root datasets/odinw --suite odinw35 \\
        --datasets pothole,PascalVOC train.device=cpu

Writes ``<output>/odinw_results.json`` (per-dataset AP/AP50/AP75, the average, the missing
datasets) and each evaluator's files under ``<output>/<dataset>/``. An existing results file is
never overwritten: pick another ``--output``.
"""

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

import torch
from detectron2.utils.logger import setup_logger

from grounding_dino.data.datasets.odinw import ODINW_SUITES, register_odinw_suite
from grounding_dino.evaluation.odinw import evaluate_datasets, format_suite_table, summarize_suite
from grounding_dino.io.atomic import atomic_file
from grounding_dino.model_zoo import build_model, get_config

__all__ = ["main", "parse_args"]

logger = logging.getLogger("evaluate_odinw")

RESULTS_NAME = "odinw_results.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Zero-shot COCO AP of a Grounding DINO model on the ODinW-13/35 datasets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="a lazy config (model, dataloader)")
    parser.add_argument(
        "--weights", default=None, help="checkpoint to evaluate (default: train.init_checkpoint)"
    )
    parser.add_argument("--root", required=True, help="the ODinW folder (GLIP's odinw/)")
    parser.add_argument("--suite", choices=sorted(ODINW_SUITES), default="odinw13")
    parser.add_argument(
        "--datasets", default=None, help="comma-separated subset of the suite (GLIP config names)"
    )
    parser.add_argument(
        "--output", default=None, help="results folder (default: <train.output_dir>/<suite>)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return parser.parse_args(argv)


def _load_config(args):
    cfg = get_config(args.config_file, args.opts)
    for key in ("model", "dataloader"):
        if key not in cfg:
            raise SystemExit(f"{args.config_file} defines no '{key}'")
    for key in ("test", "evaluator"):
        if key not in cfg.dataloader:
            raise SystemExit(f"{args.config_file} defines no 'dataloader.{key}'")
    return cfg


def _build_model(cfg, weights: Optional[str]):
    """The model with its weights (``--weights``, else ``train.init_checkpoint``); the
    evaluation runs it without its display threshold (``evaluation_settings``)."""
    try:
        return build_model(cfg, weights)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logger(name="evaluate_odinw")
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="grounding_dino")
    cfg = _load_config(args)
    output = args.output or os.path.join(
        cfg.get("train", {}).get("output_dir", "output"), args.suite
    )
    results_file = os.path.join(output, RESULTS_NAME)
    if os.path.exists(results_file):
        raise SystemExit(f"{results_file} already exists; pass another --output")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    try:
        found = register_odinw_suite(args.root, args.suite, datasets)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    suite_size = len(ODINW_SUITES[args.suite])  # a --datasets subset is not the suite's average

    results = {}
    if found.registered:
        model = _build_model(cfg, args.weights)
        with torch.no_grad():
            results = evaluate_datasets(cfg, model, found.registered, output)
    summary = summarize_suite(args.suite, results, found.missing, suite_size)
    summary.update(
        config_file=args.config_file, weights=args.weights, root=args.root, requested=datasets
    )
    os.makedirs(output, exist_ok=True)
    with atomic_file(results_file, replace=False) as f:
        json.dump(summary, f, indent=2)
    print(format_suite_table(summary))
    print(f"\nWrote {results_file}")
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary["num_evaluated"] else 1)
