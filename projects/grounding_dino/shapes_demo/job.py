"""
The offline main job (``make demo``, ``python tools/demo_job.py``): train the tiny Grounding
DINO of the packaged ``shapes_tiny.py`` config (``configs/shapes_tiny.py`` in the repository)
from scratch on the CPU on the synthetic shapes datasets, through ``train_net.py``'s driver
(:func:`grounding_dino.engine.do_train`); evaluate zero-shot detection (``shapes_val``,
``shapes_val_unseen``) and referring expressions (``shapes_rec_val``) with the project's
evaluators, and draw predictions (:mod:`.draw`).

Everything goes under ``--output`` (default ``output/demo``):

- ``shapes/``: the generated datasets (cached, deterministic);
- ``model_final.pth``, ``config.yaml``, ``metrics.json``: the trained model (holding a record
  of the config it was trained with), its config and the training log (and what
  ``train_net.py``'s writers add: ``last_checkpoint``, TensorBoard events);
- ``inference/<dataset>/``: the evaluators' files;
- ``results.json``: ``{"bbox": {"AP", "AP50", ...}, "bbox_unseen": {...}, "rec":
  {"Acc@0.5", ...}}`` in percent (detectron2's results format);
- ``run_info.json``: iterations, times, whether the checkpoint was reused;
- ``det_<k>.png``, ``rec_<k>.png``: predictions with their phrases on validation images.

A second run reuses ``model_final.pth`` and only evaluates and draws when the model was
trained with the same config: the resolved config with the command line's overrides,
``--max-iter`` and the dataset generation (``--num-train``, ``--num-val``, ``shapes``). Otherwise,
or with ``--retrain``, it says why and trains again, replacing the old run's files: training
runs in ``<output>/.training`` and its model and ``config.yaml`` replace the old ones together
when it has ended (:mod:`.staging`; the job says which files it replaced), so an interrupted
retraining leaves the old model with its own config.
"""

import argparse
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import LazyConfig, instantiate

from .. import model_zoo
from ..checkpoint import CheckpointMismatchError, GroundingDINOCheckpointer
from ..data.synthetic import register_shapes_datasets
from ..engine import evaluate as evaluate_model
from ..engine import format_duration
from ..evaluation import build_evaluator
from ..io.coco_files import write_json_atomic
from ..precision import describe_cpu
from .draw import draw_predictions
from .record import CHECKPOINT_NAME, config_record, reuse_decision
from .staging import publish_run, start_staging
from .training import (
    plan_parallelism,
    print_sampling_mix,
    seed_everything,
    train_in_processes,
    train_model,
    usable_cores,
)

__all__ = ["main", "parse_args", "load_config", "run_demo", "default_config_file", "evaluate"]

# (dataset, key in results.json, key of the evaluator's results)
EVALUATIONS = (
    ("shapes_val", "bbox", "bbox"),
    ("shapes_val_unseen", "bbox_unseen", "bbox"),
    ("shapes_rec_val", "rec", "rec"),
)


def default_config_file() -> str:
    """The packaged ``shapes_tiny.py`` (``grounding_dino.model_zoo``)."""
    return model_zoo.get_config_file("shapes_tiny.py")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/demo_job.py",
        description="Train, evaluate and draw the tiny Grounding DINO on synthetic shapes (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config-file", default=None, help="default: the packaged shapes_tiny.py")
    parser.add_argument("--output", default=os.path.join("output", "demo"))
    parser.add_argument("--max-iter", type=int, default=None, help="default: train.max_iter")
    parser.add_argument("--retrain", action="store_true", help="train even if a model exists")
    parser.add_argument("--num-train", type=int, default=None, help="default: shapes.num_train")
    parser.add_argument("--num-val", type=int, default=None, help="default: shapes.num_val")
    parser.add_argument("--num-draw", type=int, default=3, help="pictures per task")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training processes (data-parallel, gloo); default: one per usable core, at most "
        "the batch size and a divisor of it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per training process; default: usable cores // workers "
        "(evaluation and drawing use all usable cores)",
    )
    parser.add_argument(
        "--log-period",
        type=int,
        default=25,
        help="iterations between prints and metrics.json lines (train.log_period)",
    )
    parser.add_argument("--draw-threshold", type=float, default=0.3)
    parser.add_argument(
        "--draw-seed", type=int, default=0, help="seed of the random choice of drawn images"
    )
    parser.add_argument(
        "--checkpoint-period",
        type=int,
        default=0,
        help="also save every N iterations, keeping all (train.checkpointer; 0: no)",
    )
    parser.add_argument(
        "--masks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the detector, train the small SAM on the shapes' masks and report segm AP "
        "beside bbox AP (default: on; --no-masks stops at boxes)",
    )
    parser.add_argument(
        "--retrain-masks", action="store_true", help="train the small SAM even if one exists"
    )
    parser.add_argument(
        "--mask-iter", type=int, default=None, help="the small SAM's iterations (sam_shapes.py)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "threads", "workers", "log_period"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_iter is not None and args.max_iter < 1:
        raise SystemExit(f"--max-iter must be >= 1, got {args.max_iter}")
    return args


def load_config(args: argparse.Namespace):
    """
    The config (``--config-file``, default :func:`default_config_file`) with the overrides
    and the job's options: ``train.output_dir``, the CPU, ``--max-iter``, ``--log-period``
    and ``--checkpoint-period`` (periodic checkpoints all kept); no evaluation during
    training (the job evaluates after it, on three datasets).

    Returns:
        (config, config file).
    """
    config_file = args.config_file or default_config_file()
    cfg = model_zoo.get_config(config_file, list(args.opts or []))
    cfg.train.output_dir = args.output
    cfg.train.device = "cpu"
    if args.max_iter is not None:
        cfg.train.max_iter = args.max_iter
    cfg.train.log_period = args.log_period
    cfg.train.checkpointer.update(period=args.checkpoint_period, max_to_keep=None)
    cfg.train.eval_period = -1
    return cfg, config_file


# ----------------------------------------------------------------------------- evaluation
def evaluate(
    cfg, model, output_dir: str, mask_stage=None, datasets: Optional[Sequence[str]] = None
) -> Dict[str, Dict[str, float]]:
    """Runs the project's evaluators on the three validation splits (``EVALUATIONS``, or
    those of them named in ``datasets``); with ``mask_stage`` ``shapes_val`` also gets
    ``segm`` (masks for its :data:`.masks.MASK_EVAL_MAX_PER_IMAGE` best boxes per image)."""
    from .masks import MASK_EVAL_MAX_PER_IMAGE

    results = {}
    for dataset, key, result_key in EVALUATIONS:
        if datasets is not None and dataset not in datasets:
            continue
        cfg.dataloader.test.dataset.names = dataset
        loader = instantiate(cfg.dataloader.test)
        evaluator = build_evaluator(
            dataset, output_dir=os.path.join(output_dir, "inference", dataset)
        )
        stage = mask_stage if dataset == "shapes_val" else None
        start = time.perf_counter()
        # The evaluation settings of train_net.py: no score threshold, the top 300 per image.
        out = evaluate_model(model, loader, evaluator, stage, MASK_EVAL_MAX_PER_IMAGE)
        if result_key not in out:
            raise KeyError(f"The evaluator of {dataset} returned {sorted(out)}, no {result_key!r}")
        results[key] = {k: _finite(v) for k, v in out[result_key].items()}
        line = _headline(key, results[key])
        if stage is not None:
            results["segm"] = {k: _finite(v) for k, v in out["segm"].items()}
            line += f"; segm {_headline('segm', results['segm'])}"
        print(f"[eval] {dataset}: {line} ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def train_mask_stage_for(
    output_dir: str, shapes: Dict, info: Dict, retrain: bool = False, overrides=()
):
    """The demo's small SAM (:func:`.masks.train_mask_stage`, one thread), timed: its training
    time goes into ``info``; returns a :class:`.masks.TimedStage`."""
    from .masks import TimedStage, train_mask_stage

    # train_mask_stage restores the caller's thread count itself.
    stage, mask_info = train_mask_stage(
        output_dir, shapes, retrain=retrain, threads=1, overrides=overrides
    )
    info.update(mask_info)
    return TimedStage(stage)


def _finite(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _headline(key: str, metrics: Dict) -> str:
    names = ("Acc@0.5",) if key == "rec" else ("AP", "AP50")
    return "  ".join(
        f"{n} {metrics[n]:.1f}" if metrics.get(n) is not None else f"{n} n/a" for n in names
    )


# ----------------------------------------------------------------------------------- main
def run_demo(args: argparse.Namespace) -> Dict:
    """The whole job; returns the content of ``results.json``."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _shapes_settings(cfg, config_file: str, args: argparse.Namespace) -> Dict:
    """The generation parameters actually used (they go into the config and its record)."""
    if "shapes" not in cfg:
        raise KeyError(
            f"{config_file} has no 'shapes' entry (the synthetic data's num_train, num_val, "
            "image_size), which the demo job needs; see configs/shapes_tiny.py"
        )
    shapes = dict(cfg.shapes)
    for key in ("num_train", "num_val", "image_size"):
        if key not in shapes:
            raise KeyError(f"{config_file}: shapes.{key} is not set")
    shapes.update(
        num_train=args.num_train or int(shapes["num_train"]),
        num_val=args.num_val or int(shapes["num_val"]),
        image_size=int(shapes["image_size"]),
    )
    return shapes


def _run(args: argparse.Namespace) -> Dict:
    output_dir = args.output
    os.makedirs(output_dir, exist_ok=True)
    job_start = time.perf_counter()
    print(f"[cpu] {describe_cpu()}; {usable_cores()} usable core(s)", flush=True)
    cfg, config_file = load_config(args)
    start = time.perf_counter()
    shapes = cfg.shapes = _shapes_settings(cfg, config_file, args)
    register_shapes_datasets(root=os.path.join(output_dir, "shapes"), **shapes)
    print(
        f"[data] shapes datasets ready in {output_dir}/shapes ({shapes['num_train']} train, "
        f"{shapes['num_val']} val images of {shapes['image_size']} px; "
        f"{time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    record = config_record(cfg)
    reuse, message = reuse_decision(output_dir, record, args.retrain)
    print(message, flush=True)
    seed_everything(cfg.train.seed)
    model = instantiate(cfg.model)
    model.to("cpu")
    checkpoint = os.path.join(output_dir, CHECKPOINT_NAME + ".pth")
    cores = usable_cores()
    batch_size = int(cfg.dataloader.train.total_batch_size)
    workers, threads = plan_parallelism(batch_size, args.workers, args.threads, cores)
    torch.set_num_threads(cores)  # evaluation and drawing: one process, every core
    info = {"config_file": config_file, "cores": cores}
    if reuse:
        try:
            GroundingDINOCheckpointer(model, output_dir).load(checkpoint)
        except CheckpointMismatchError as error:
            raise SystemExit(
                f"{error}\nThe model code changed since {checkpoint} was trained; run again "
                "with --retrain to train a new one."
            ) from error
        _restore_config(cfg, output_dir)
        previous = _read_json(os.path.join(output_dir, "run_info.json"))
        info.update(
            reused_checkpoint=True,
            iterations=previous.get("iterations"),
            train_seconds=previous.get("train_seconds"),
            workers=previous.get("workers"),
            threads=previous.get("threads"),
        )
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"[train] training from scratch: {cfg.train.max_iter} iterations, batch "
            f"{cfg.dataloader.train.total_batch_size}, {trainable / 1e6:.2f}M trainable "
            f"parameters; {cores} usable core(s): {workers} data-parallel process(es) x "
            f"{threads} thread(s) (--workers, --threads)",
            flush=True,
        )
        print_sampling_mix(cfg)
        # Trained in a staging folder (a fresh metrics.json too: JSONWriter appends), then the
        # model and config.yaml are published together (see .staging).
        cfg.train.output_dir = start_staging(output_dir)
        shapes_root = os.path.join(output_dir, "shapes")
        if workers > 1:
            trained = train_in_processes(cfg, workers, threads, record, shapes_root)
            GroundingDINOCheckpointer(model).load(
                os.path.join(cfg.train.output_dir, CHECKPOINT_NAME + ".pth")
            )
        else:
            torch.set_num_threads(threads)
            trained = train_model(cfg, model, record)
            torch.set_num_threads(cores)
        staging, cfg.train.output_dir = cfg.train.output_dir, output_dir
        LazyConfig.save(cfg, os.path.join(staging, "config.yaml"))
        replaced = publish_run(staging, output_dir)
        for name in ("results.json", "run_info.json"):  # the old model's; written again below
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
                replaced.append(name)
        if replaced:
            print(
                f"[train] replaced the earlier run's {', '.join(replaced)} in {output_dir} "
                "with the new model and its config",
                flush=True,
            )
        info.update(reused_checkpoint=False, workers=workers, threads=threads, **trained)

    # The mask stage (.masks): a small SAM trained on the shapes' masks, then run on the
    # detector's boxes in the shapes_val evaluation and in the pictures.
    mask_stage = None
    if args.masks:
        overrides = [] if args.mask_iter is None else [f"train.max_iter={args.mask_iter}"]
        mask_stage = train_mask_stage_for(output_dir, shapes, info, args.retrain_masks, overrides)
    start = time.perf_counter()
    results = evaluate(cfg, model, output_dir, mask_stage=mask_stage)
    info["eval_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(os.path.join(output_dir, "results.json"), results)

    pictures = draw_predictions(
        cfg,
        model,
        output_dir,
        args.num_draw,
        args.draw_threshold,
        seed=args.draw_seed,
        mask_stage=mask_stage,
    )
    if mask_stage is not None:
        info.update(mask_stage.timing())
    info["job_seconds"] = round(time.perf_counter() - job_start, 1)
    if not info["reused_checkpoint"]:
        write_json_atomic(os.path.join(output_dir, "run_info.json"), info)
    _summary(results, info, output_dir, pictures)
    return results


def _restore_config(cfg, output_dir: str) -> None:
    """Writes the reused model's ``config.yaml`` when a run interrupted while publishing
    left the model without it (the model's record equals ``cfg``: it is its config)."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        staging = start_staging(output_dir)
        LazyConfig.save(cfg, os.path.join(staging, "config.yaml"))
        publish_run(staging, output_dir)
        print(f"[train] wrote the missing {path} of the reused model", flush=True)


def _read_json(path: str) -> Dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _summary(results: Dict, info: Dict, output_dir: str, pictures: List[str]) -> None:
    def get(key, metric):
        value = results.get(key, {}).get(metric)
        return "n/a" if value is None else f"{value:.1f}"

    trained = (
        f"reused checkpoint ({info.get('iterations')} iterations)"
        if info["reused_checkpoint"]
        else f"trained {info['iterations']} iterations in {format_duration(info['train_seconds'])}"
    )
    if info.get("workers"):
        trained += f" ({info['workers']} process(es) x {info['threads']} thread(s))"
    lines = [
        "",
        "=" * 72,
        f"Grounding DINO tiny on synthetic shapes: {trained}",
        f"  zero-shot detection shapes_val:        AP {get('bbox', 'AP')}  "
        f"AP50 {get('bbox', 'AP50')}",
        f"  unseen colour-shape pairs (val_unseen): AP {get('bbox_unseen', 'AP')}  "
        f"AP50 {get('bbox_unseen', 'AP50')}",
        f"  referring expressions shapes_rec_val:  Acc@0.5 {get('rec', 'Acc@0.5')}",
        f"  results: {os.path.join(output_dir, 'results.json')}",
        f"  pictures: {', '.join(pictures)}",
        f"  job time: {format_duration(info['job_seconds'])}",
        "=" * 72,
    ]
    if "segm" in results:  # the mask stage ran (--masks)
        lines.insert(
            -4,
            f"  masks (small SAM on the boxes) shapes_val: segm AP {get('segm', 'AP')}  "
            f"AP50 {get('segm', 'AP50')}",
        )
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_demo(args)
