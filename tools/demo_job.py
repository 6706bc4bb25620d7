"""
The offline main job (``make demo``): train the tiny Grounding DINO of the packaged
``shapes_tiny.py`` config (``configs/shapes_tiny.py`` in the repository) from scratch on the
CPU on the synthetic shapes datasets, evaluate zero-shot detection (``shapes_val``,
``shapes_val_unseen``) and referring expressions (``shapes_rec_val``) with the project's
evaluators, and draw predictions (``demo_visualize.py``).

Everything goes under ``--output`` (default ``output/demo``):

- ``shapes/``: the generated datasets (cached, deterministic);
- ``model_final.pth``, ``config.yaml``, ``metrics.json``: the trained model (holding a record
  of the config it was trained with), its config and the training log;
- ``inference/<dataset>/``: the evaluators' files;
- ``results.json``: ``{"bbox": {"AP", "AP50", ...}, "bbox_unseen": {...}, "rec":
  {"Acc@0.5", ...}}`` in percent (detectron2's results format);
- ``run_info.json``: iterations, times, whether the checkpoint was reused;
- ``det_<k>.png``, ``rec_<k>.png``: predictions with their phrases on validation images.

A second run reuses ``model_final.pth`` and only evaluates and draws when the model was
trained with the same config: the resolved config with the command line's overrides,
``--max-iter`` and the dataset generation (``--num-train``, ``--num-val``, ``shapes``). Otherwise,
or with ``--retrain``, it says why and trains again, replacing the old run's files. Examples::

    python tools/demo_job.py                      # make demo
    python tools/demo_job.py --retrain --max-iter 500
    python tools/demo_job.py --output /tmp/d --max-iter 3 --num-train 8 --num-val 4
    python tools/demo_job.py optimizer.lr=1e-4    # config overrides at the end
"""

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import hooks
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from omegaconf import OmegaConf

from grounding_dino import model_zoo
from grounding_dino.checkpoint import CheckpointMismatchError, GroundingDINOCheckpointer
from grounding_dino.convert.checkpoint import load_checkpoint_file
from grounding_dino.data.samplers import describe_shares, kind_shares
from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.engine import build_trainer, launch, wrap_ddp
from grounding_dino.engine import evaluate as evaluate_model
from grounding_dino.evaluation import build_evaluator

# A module next to this script (python puts the script's folder first on sys.path).
from demo_visualize import draw_predictions

__all__ = [
    "main",
    "parse_args",
    "run_demo",
    "default_config_file",
    "config_record",
    "config_differences",
    "reuse_decision",
]

logger = logging.getLogger("demo_job")

CHECKPOINT_NAME = "model_final"
CONFIG_RECORD_KEY = "trained_config"  # in model_final.pth: config_record() of its training
# Config keys that do not change the trained model: where the run is written.
IGNORED_CONFIG_KEYS = ("train.output_dir",)
# Files of a run that training again replaces.
RUN_FILES = (CHECKPOINT_NAME + ".pth", "config.yaml", "metrics.json", "run_info.json")
TRAIN_INFO = "train_info.json"  # written by the main training process, read and removed
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
    parser.add_argument("--log-period", type=int, default=25, help="iterations between prints")
    parser.add_argument("--draw-threshold", type=float, default=0.3)
    parser.add_argument(
        "--draw-seed", type=int, default=0, help="seed of the random choice of drawn images"
    )
    parser.add_argument(
        "--checkpoint-period", type=int, default=0, help="also save every N iterations (0: no)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "threads", "workers", "log_period"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_iter is not None and args.max_iter < 1:
        raise SystemExit(f"--max-iter must be >= 1, got {args.max_iter}")
    return args


# ------------------------------------------------------------------------------- training
class ProgressPrinter(HookBase):
    """Prints iteration, loss, seconds per iteration and ETA every ``period`` iterations."""

    def __init__(self, max_iter: int, period: int):
        self.max_iter = max_iter
        self.period = period
        self._start = None
        self._start_iter = 0

    def before_train(self):
        self._start = time.perf_counter()
        self._start_iter = self.trainer.iter

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period and done != self.max_iter:
            return
        storage = self.trainer.storage
        elapsed = time.perf_counter() - self._start
        per_iter = elapsed / max(1, done - self._start_iter)
        eta = per_iter * (self.max_iter - done)
        loss = storage.history("total_loss").median(min(self.period, done))
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        print(
            f"[train] iter {done}/{self.max_iter}  loss {loss:.3f}  lr {lr:.2e}  "
            f"{per_iter:.2f} s/it  elapsed {_fmt(elapsed)}  ETA {_fmt(eta)}",
            flush=True,
        )


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _seed_value(seed) -> int:
    return int(seed) if seed is not None and int(seed) >= 0 else 0


def _seed(seed: int) -> None:
    seed = _seed_value(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_model(
    cfg, model, output_dir: str, log_period: int, checkpoint_period: int = 0, record=None
) -> Dict:
    """
    Trains ``model`` for ``cfg.train.max_iter`` iterations in this process (one of the
    data-parallel workers when a process group is initialised: ``model`` is then wrapped in
    DistributedDataParallel here, and only the main process prints and writes); saves
    ``model_final.pth`` with ``record`` (:func:`config_record` of ``cfg``) under
    ``"trained_config"``.
    """
    from detectron2.utils.events import JSONWriter

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    del cfg.optimizer.params.model
    loader = instantiate(cfg.dataloader.train)
    model = wrap_ddp(model, "cpu", **cfg.train.ddp)
    trainer = build_trainer(cfg.train, model, loader, optimizer)
    max_iter = int(cfg.train.max_iter)
    checkpointer = GroundingDINOCheckpointer(model, output_dir)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            (
                hooks.PeriodicCheckpointer(checkpointer, checkpoint_period, max_iter=max_iter)
                if checkpoint_period > 0
                else None
            ),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            ProgressPrinter(max_iter, log_period) if main_process else None,
            (
                hooks.PeriodicWriter(
                    [JSONWriter(os.path.join(output_dir, "metrics.json"))], period=log_period
                )
                if main_process
                else None
            ),
        ]
    )
    start = time.perf_counter()
    trainer.train(0, max_iter)
    seconds = time.perf_counter() - start
    checkpointer.save(CHECKPOINT_NAME, iteration=max_iter, **{CONFIG_RECORD_KEY: record})
    return {"iterations": max_iter, "train_seconds": round(seconds, 1)}


def print_sampling_mix(cfg) -> None:
    """Says how often each record kind is drawn when the config sets a kind sampler."""
    sampler = cfg.dataloader.train.get("sampler")
    if sampler is None or "repeat_factors" not in sampler:
        return
    factors = dict(sampler.repeat_factors)
    shares = kind_shares(instantiate(cfg.dataloader.train.dataset), factors)
    print(
        f"[data] training samples: {describe_shares(shares)} (repeat factors {factors}, "
        "dataloader.train.sampler)",
        flush=True,
    )


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_parallelism(
    batch_size: int, workers: Optional[int], threads: Optional[int], cores: int
) -> Tuple[int, int]:
    """
    Training processes and torch threads per process. By default one process per core
    (data-parallel training of this small model scales better than intra-op threads), as many
    as divide the batch, and the remaining cores as threads.

    Raises:
        SystemExit: ``workers`` does not divide ``batch_size``.
    """
    if workers is None:
        workers = max(w for w in range(1, min(cores, batch_size) + 1) if batch_size % w == 0)
    elif batch_size % workers:
        raise SystemExit(
            f"--workers {workers} does not divide the batch size {batch_size} "
            "(dataloader.train.total_batch_size); each process takes an equal share"
        )
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def _train_worker(
    cfg, output_dir: str, threads: int, log_period: int, checkpoint_period: int, record: Dict
) -> None:
    """One data-parallel training process (spawned by :func:`train_in_processes`)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    register_shapes_datasets(root=os.path.join(output_dir, "shapes"), generate=False, **cfg.shapes)
    _seed(cfg.train.seed)  # the same initialisation everywhere (DDP also broadcasts rank 0's)
    model = instantiate(cfg.model)
    _seed(_seed_value(cfg.train.seed) + comm.get_rank())  # different augmentations per rank
    info = train_model(cfg, model, output_dir, log_period, checkpoint_period, record=record)
    if comm.is_main_process():
        _write_json(os.path.join(output_dir, TRAIN_INFO), info)


def train_in_processes(
    cfg,
    output_dir: str,
    workers: int,
    threads: int,
    log_period: int,
    checkpoint_period: int,
    record: Dict,
) -> Dict:
    """Trains in ``workers`` spawned processes (gloo) and returns the main one's info; the
    model is in ``output_dir/model_final.pth``."""
    info_path = os.path.join(output_dir, TRAIN_INFO)
    if os.path.isfile(info_path):
        os.remove(info_path)
    start = time.perf_counter()
    launch(
        _train_worker,
        workers,
        dist_url="auto",
        args=(cfg, output_dir, threads, log_period, checkpoint_period, record),
        device="cpu",
    )
    info = _read_json(info_path)
    if not info:
        raise RuntimeError(f"The training processes ended without writing {info_path}")
    os.remove(info_path)
    # The wall time of the whole launch (process start-up included).
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    return info


# ----------------------------------------------------------------------------- evaluation
def evaluate(cfg, model, output_dir: str) -> Dict[str, Dict[str, float]]:
    """Runs the project's evaluators on the three validation splits (``EVALUATIONS``)."""
    results = {}
    for dataset, key, result_key in EVALUATIONS:
        cfg.dataloader.test.dataset.names = dataset
        loader = instantiate(cfg.dataloader.test)
        evaluator = build_evaluator(
            dataset, output_dir=os.path.join(output_dir, "inference", dataset)
        )
        start = time.perf_counter()
        # The evaluation settings of train_net.py: no score threshold, the top 300 per image.
        out = evaluate_model(model, loader, evaluator)
        if result_key not in out:
            raise KeyError(f"The evaluator of {dataset} returned {sorted(out)}, no {result_key!r}")
        results[key] = {k: _finite(v) for k, v in out[result_key].items()}
        print(
            f"[eval] {dataset}: {_headline(key, results[key])} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return results


def _finite(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _headline(key: str, metrics: Dict) -> str:
    names = ("Acc@0.5",) if key == "rec" else ("AP", "AP50")
    return "  ".join(
        f"{n} {metrics[n]:.1f}" if metrics.get(n) is not None else f"{n} n/a" for n in names
    )


# ------------------------------------------------------------------------ checkpoint reuse
def config_record(cfg) -> Dict:
    """
    ``cfg`` as written to ``config.yaml`` (``LazyConfig.save``) and read back, resolved and
    flattened to {dotted key: value} (list items as ``key.<index>``): plain values, for the
    checkpoint and for comparison.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.yaml")
        LazyConfig.save(cfg, path)
        try:
            saved = LazyConfig.load(path)
        except Exception as error:
            raise ValueError(
                f"The demo config does not round-trip through yaml: {error}"
            ) from error
    flat = {}

    def visit(prefix: str, value) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(item, (dict, list)) and item:
                visit(name, item)
            else:
                flat[name] = item

    visit("", OmegaConf.to_container(saved, resolve=True))
    return flat


def config_differences(trained: Dict, current: Dict) -> List[str]:
    """``"key: trained -> current"`` for each key of two :func:`config_record` that differs
    (``IGNORED_CONFIG_KEYS`` aside), sorted by key."""

    def show(record, key):
        return _short(repr(record[key])) if key in record else "(absent)"

    keys = sorted((set(trained) | set(current)) - set(IGNORED_CONFIG_KEYS))
    return [
        f"{key}: {show(trained, key)} -> {show(current, key)}"
        for key in keys
        if key not in trained or key not in current or trained[key] != current[key]
    ]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reuse_decision(output_dir: str, record: Dict, retrain: bool) -> Tuple[bool, str]:
    """
    Whether ``output_dir/model_final.pth`` may be reused for a run of config ``record``
    (:func:`config_record`): only when it holds a record equal to ``record``.

    Returns:
        (reuse, the message saying what happens and why).
    """
    checkpoint = os.path.join(output_dir, CHECKPOINT_NAME + ".pth")
    if not os.path.isfile(checkpoint):
        why = f"no trained model in {output_dir}"
    elif retrain:
        why = "--retrain"
    else:
        trained = load_checkpoint_file(checkpoint).get(CONFIG_RECORD_KEY)
        if not isinstance(trained, dict):
            why = f"{checkpoint} holds no record of the config it was trained with (an older job)"
        else:
            differences = config_differences(trained, record)
            if not differences:
                return True, (
                    f"[train] reusing the trained model {checkpoint} (trained with the same "
                    "config): skipping training, only evaluating and drawing (--retrain trains "
                    "again)"
                )
            shown = "; ".join(differences[:5])
            more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
            why = (
                f"{checkpoint} was trained with a different config ({len(differences)} "
                f"value(s) differ, trained -> now: {shown}{more})"
            )
    existing = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    replaced = (
        f" The new run replaces the old run's {', '.join(existing)} in {output_dir} (copy "
        "them elsewhere to keep them; an old model is overwritten when training ends)."
        if existing
        else ""
    )
    return False, f"[train] training: {why}.{replaced}"


# ----------------------------------------------------------------------------------- main
def load_config(args: argparse.Namespace):
    config_file = args.config_file or default_config_file()
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(args.opts or []))
    cfg.train.output_dir = args.output
    cfg.train.device = "cpu"
    if args.max_iter is not None:
        cfg.train.max_iter = args.max_iter
    return cfg, config_file


def run_demo(args: argparse.Namespace) -> Dict:
    """The whole job; returns the content of ``results.json``."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict:
    output_dir = args.output
    os.makedirs(output_dir, exist_ok=True)
    job_start = time.perf_counter()
    cfg, config_file = load_config(args)
    start = time.perf_counter()
    # The generation parameters actually used go into the config (and so into its record).
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
    cfg.shapes = shapes
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
    _seed(cfg.train.seed)
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
        LazyConfig.save(cfg, os.path.join(output_dir, "config.yaml"))
        metrics = os.path.join(output_dir, "metrics.json")
        if os.path.isfile(metrics):  # JSONWriter appends: start the new run's log afresh
            os.remove(metrics)
        if workers > 1:
            trained = train_in_processes(
                cfg, output_dir, workers, threads, args.log_period, args.checkpoint_period, record
            )
            GroundingDINOCheckpointer(model, output_dir).load(checkpoint)
        else:
            torch.set_num_threads(threads)
            trained = train_model(
                cfg, model, output_dir, args.log_period, args.checkpoint_period, record=record
            )
            torch.set_num_threads(cores)
        info.update(reused_checkpoint=False, workers=workers, threads=threads, **trained)

    start = time.perf_counter()
    results = evaluate(cfg, model, output_dir)
    info["eval_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    pictures = draw_predictions(
        cfg, model, output_dir, args.num_draw, args.draw_threshold, seed=args.draw_seed
    )
    info["job_seconds"] = round(time.perf_counter() - job_start, 1)
    if not info["reused_checkpoint"]:
        _write_json(os.path.join(output_dir, "run_info.json"), info)
    _summary(results, info, output_dir, pictures)
    return results


def _read_json(path: str) -> Dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _summary(results: Dict, info: Dict, output_dir: str, pictures: List[str]) -> None:
    def get(key, metric):
        value = results.get(key, {}).get(metric)
        return "n/a" if value is None else f"{value:.1f}"

    trained = (
        f"reused checkpoint ({info.get('iterations')} iterations)"
        if info["reused_checkpoint"]
        else f"trained {info['iterations']} iterations in {_fmt(info['train_seconds'])}"
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
        f"  job time: {_fmt(info['job_seconds'])}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_demo(args)


if __name__ == "__main__":
    main(sys.argv[1:])
