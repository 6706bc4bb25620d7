"""
The demo job's mask stage (Grounded-SAM on the shapes): a small box-prompted segmenter
(transformers' ``SamModel``, ``configs/sam_shapes.py``) trained from scratch on the shapes'
exact masks with the project's engine, then run on the detector's boxes: ``segm`` AP on
``shapes_val`` beside ``bbox`` AP, and masks in the pictures.

It runs inside ``make demo`` after the detector, and alone against a trained detector
(:mod:`.mask_job`)::

    python -m grounding_dino.shapes_demo.mask_job --detector output/demo --output out/masks

The segmenter is written to ``<output>/sam`` (a transformers folder: ``--sam output/demo/sam``
on the other commands) with ``training_record.json``; a later run with the same config reuses
it (``--retrain-masks`` trains again).
"""

import contextlib
import json
import os
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import model_zoo
from ..data.synthetic import register_shapes_datasets
from ..engine import do_train
from ..io.coco_files import write_json_atomic
from ..segment import MaskStage
from .record import config_differences, config_record
from .training import seed_everything

__all__ = ["SAM_CONFIG", "MASK_EVAL_MAX_PER_IMAGE", "TimedStage", "train_mask_stage"]

SAM_CONFIG = "sam_shapes.py"
# Masks per validation image in the evaluation: shapes_val has at most 5 objects per image, so
# the 10 best boxes hold nearly every detection that counts for the mask AP (the box AP keeps
# 300); each further box costs ~2 ms of decoder and upsampling per image on the CPU.
MASK_EVAL_MAX_PER_IMAGE = 10
RECORD_NAME = "training_record.json"


@contextlib.contextmanager
def torch_threads(threads: int):
    """Runs the block on ``threads`` torch threads, then restores the caller's number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TimedStage:
    """
    A mask stage that adds up its own wall and CPU time (the stage's cost in the job), run on
    ``threads`` torch threads: the demo's segmenter is so small that a second thread only waits
    (on 2 cores, with the other core busy, 10 boxes took 4x as long on 2 threads as on 1).
    """

    def __init__(self, stage: MaskStage, threads: int = 1):
        self.stage, self.threads, self.seconds, self.cpu_seconds = stage, int(threads), 0.0, 0.0

    def __call__(self, image_rgb, boxes, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            with torch_threads(self.threads):
                return self.stage(image_rgb, boxes, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu

    def timing(self) -> Dict[str, float]:
        return {
            "mask_stage_seconds": round(self.seconds, 1),
            "mask_stage_cpu_seconds": round(self.cpu_seconds, 1),
        }


def sam_config(output_dir: str, shapes: Dict, overrides: Sequence[str] = ()):
    """``configs/sam_shapes.py`` with the demo's shapes and ``train.output_dir``."""
    cfg = model_zoo.get_config(SAM_CONFIG, list(overrides))
    cfg.shapes = dict(shapes)
    cfg.train.output_dir = os.path.join(output_dir, ".sam_training")
    cfg.train.hooks[0].folder = os.path.join(output_dir, "sam")
    return cfg


def train_mask_stage(
    output_dir: str,
    shapes: Dict,
    *,
    shapes_root: Optional[str] = None,
    retrain: bool = False,
    threads: int = 1,
    overrides=(),
) -> Tuple[MaskStage, Dict]:
    """
    Trains the segmenter of :data:`SAM_CONFIG` on ``shapes_train`` (generated with ``shapes``
    in ``shapes_root``, default ``<output_dir>/shapes``) unless ``<output_dir>/sam`` holds one
    trained with the same config, and loads it.

    Returns:
        (the mask stage, {"sam_reused", "sam_train_seconds", "sam_train_cpu_seconds",
        "sam_iterations"}).
    """
    cfg = sam_config(output_dir, shapes, overrides)
    # Loading the config registered the shapes datasets in their default folder: register them
    # again where the caller's are (the same names the detector's evaluation then reads).
    register_shapes_datasets(root=shapes_root or os.path.join(output_dir, "shapes"), **shapes)
    folder = cfg.train.hooks[0].folder
    record = config_record(cfg)
    record.pop("train.hooks.0.folder", None)
    record_path = os.path.join(folder, RECORD_NAME)
    info = {"sam_iterations": int(cfg.train.max_iter)}
    reason = "--retrain-masks" if retrain else f"no trained segmenter in {folder}"
    if not retrain and os.path.isfile(record_path):
        with open(record_path) as f:
            differences = config_differences(json.load(f), record)
        if not differences:
            print(f"[masks] reusing the segmenter {folder} (same config)", flush=True)
            return MaskStage.from_pretrained(folder), {**info, "sam_reused": True}
        reason = f"{folder} was trained with another config ({'; '.join(differences[:3])})"
    print(f"[masks] training the segmenter: {reason}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    with torch_threads(threads):
        # NumPy's too: the loader's sampler draws its shuffling seed from it.
        seed_everything(cfg.train.seed)
        do_train(cfg)
    info.update(
        sam_reused=False,
        sam_train_seconds=round(time.perf_counter() - start, 1),
        sam_train_cpu_seconds=round(time.process_time() - cpu, 1),
    )
    write_json_atomic(record_path, record)
    print(
        f"[masks] trained {info['sam_iterations']} iterations in {info['sam_train_seconds']} s "
        f"({info['sam_train_cpu_seconds']} s CPU) -> {folder}",
        flush=True,
    )
    return MaskStage.from_pretrained(folder), info
