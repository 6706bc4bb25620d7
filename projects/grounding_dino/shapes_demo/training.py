"""
Training of the demo job: ``train_net.py``'s driver (:func:`grounding_dino.engine.do_train`)
in this process or in data-parallel (gloo) processes on the CPU cores, with a progress line
every ``train.log_period`` iterations (:class:`~grounding_dino.engine.ProgressPrinter`).
"""

import json
import logging
import os
import random
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.utils import comm

from ..data.samplers import describe_shares, kind_shares
from ..data.synthetic import register_shapes_datasets
from ..engine import ProgressPrinter, do_train, launch
from .record import CONFIG_RECORD_KEY

__all__ = [
    "train_model",
    "train_in_processes",
    "plan_parallelism",
    "usable_cores",
    "print_sampling_mix",
    "seed_everything",
]

TRAIN_INFO = "train_info.json"  # written by the main training process, read and removed


def _seed_value(seed) -> int:
    return int(seed) if seed is not None and int(seed) >= 0 else 0


def seed_everything(seed) -> None:
    """Seeds Python's, NumPy's and torch's generators (a negative or absent seed: 0)."""
    seed = _seed_value(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_model(cfg, model, record: Dict) -> Dict:
    """
    Trains ``model`` for ``cfg.train.max_iter`` iterations in this process (one of the
    data-parallel workers when a process group is initialised) with
    :func:`~grounding_dino.engine.do_train`, whose checkpoints (``model_final.pth`` after the
    last iteration) hold ``record`` (the :func:`~.record.config_record` of ``cfg``) under
    ``"trained_config"``. Only the main process prints and writes.
    """
    max_iter = int(cfg.train.max_iter)
    progress = ProgressPrinter(max_iter, int(cfg.train.log_period))
    start = time.perf_counter()
    do_train(
        cfg,
        model=model,
        extra_hooks=[progress if comm.is_main_process() else None],
        checkpoint_extra={CONFIG_RECORD_KEY: record},
    )
    return {"iterations": max_iter, "train_seconds": round(time.perf_counter() - start, 1)}


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


def _train_worker(cfg, threads: int, record: Dict, shapes_root: str) -> None:
    """One data-parallel training process (spawned by :func:`train_in_processes`)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    output_dir = cfg.train.output_dir
    register_shapes_datasets(root=shapes_root, generate=False, **cfg.shapes)
    seed_everything(cfg.train.seed)  # the same initialisation everywhere (DDP also broadcasts)
    model = instantiate(cfg.model)
    seed_everything(_seed_value(cfg.train.seed) + comm.get_rank())  # other augmentations per rank
    info = train_model(cfg, model, record)
    if comm.is_main_process():
        with open(os.path.join(output_dir, TRAIN_INFO), "w") as f:
            json.dump(info, f, indent=2)


def train_in_processes(cfg, workers: int, threads: int, record: Dict, shapes_root: str) -> Dict:
    """Trains in ``workers`` spawned processes (gloo) on the shapes datasets generated in
    ``shapes_root`` and returns the main one's info; the model is in
    ``train.output_dir/model_final.pth``."""
    info_path = os.path.join(cfg.train.output_dir, TRAIN_INFO)
    if os.path.isfile(info_path):
        os.remove(info_path)
    start = time.perf_counter()
    launch(
        _train_worker,
        workers,
        dist_url="auto",
        args=(cfg, threads, record, shapes_root),
        device="cpu",
    )
    if not os.path.isfile(info_path):
        raise RuntimeError(f"The training processes ended without writing {info_path}")
    with open(info_path) as f:
        info = json.load(f)
    os.remove(info_path)
    # The wall time of the whole launch (process start-up included).
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    return info
