"""
The demo job's mask stage alone, against a finished ``make demo`` folder (its ``config.yaml``
and ``model_final.pth``; the detector is not trained again)::

    python -m grounding_dino.shapes_demo.mask_job --detector output/demo --output out/masks

It trains (or reuses) the small SAM of :mod:`.masks` in ``--output/sam``, evaluates ``bbox``
and ``segm`` AP on ``shapes_val`` with the detector's boxes and draws masks; ``results.json``,
``run_info.json`` (the stage's times) and ``det_<k>.png`` go to ``--output``.
"""

import argparse
import logging
import os
import time
from typing import Dict, Optional, Sequence

from detectron2.config import LazyConfig, instantiate

from ..checkpoint import GroundingDINOCheckpointer
from ..data.synthetic import register_shapes_datasets
from ..io.coco_files import write_json_atomic
from .draw import draw_predictions
from .job import evaluate
from .masks import TimedStage, train_mask_stage

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.shapes_demo.mask_job",
        description="Train the demo's small SAM on the shapes' masks and evaluate segm AP on "
        "shapes_val with a trained demo detector's boxes.",
    )
    parser.add_argument("--detector", required=True, help="a finished make-demo folder")
    parser.add_argument("--output", required=True, help="where the segmenter and results go")
    parser.add_argument("--retrain-masks", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training")
    parser.add_argument("--num-draw", type=int, default=3)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides of sam_shapes.py")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """The mask stage alone against ``--detector`` (its ``config.yaml`` and
    ``model_final.pth``); writes ``results.json`` (``bbox`` and ``segm``), ``run_info.json``
    and ``det_<k>.png`` to ``--output``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.output, exist_ok=True)
    job_start = time.perf_counter()
    cfg = LazyConfig.load(os.path.join(args.detector, "config.yaml"))
    register_shapes_datasets(root=os.path.join(args.output, "shapes"), **cfg.shapes)
    stage, info = train_mask_stage(
        args.output,
        cfg.shapes,
        retrain=args.retrain_masks,
        threads=args.threads,
        overrides=args.opts,
    )
    model = instantiate(cfg.model)
    GroundingDINOCheckpointer(model).load(os.path.join(args.detector, "model_final.pth"))
    model.eval()
    timed = TimedStage(stage)
    start = time.perf_counter()
    results = evaluate(cfg, model, args.output, mask_stage=timed, datasets=("shapes_val",))
    info["eval_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(os.path.join(args.output, "results.json"), results)
    draw_predictions(cfg, model, args.output, args.num_draw, 0.3, mask_stage=timed, tasks=("det",))
    info.update(timed.timing(), job_seconds=round(time.perf_counter() - job_start, 1))
    write_json_atomic(os.path.join(args.output, "run_info.json"), info)
    print(
        f"[masks] shapes_val: bbox AP50 {results['bbox']['AP50']:.1f}, segm AP50 "
        f"{results['segm']['AP50']:.1f} (AP {results['segm']['AP']:.1f}); {info}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
