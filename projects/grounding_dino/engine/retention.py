"""
Retention evaluation: test sets the model should keep doing well on while it is fine-tuned
(the base model's own evaluation sets, a COCO subset with its class names...), evaluated
beside the target at every evaluation.

A config names them in ``dataloader.retention``: registered dataset names, e.g.
``dataloader.retention = ["shapes_val"]`` or, on the command line,
``'dataloader.retention=[coco_2017_val]'``. Each is evaluated with the target's test loader and
evaluator settings (mapper, augmentations, batch size), its own class names as the prompt, and
predictions in ``train.output_dir/inference/retention_<name>``. Results go beside the
target's as ``retention/<name>/bbox/AP50`` (``metrics.json``, the log, TensorBoard).
"""

import copy
import logging
import os
from typing import Dict, List

from detectron2.config import instantiate

__all__ = ["retention_names", "retention_config", "RETENTION_PREFIX"]

logger = logging.getLogger(__name__)

RETENTION_PREFIX = "retention"


def retention_names(cfg) -> List[str]:
    """``dataloader.retention`` (instantiated: an entry may be a call that registers a dataset
    and returns its name, e.g. ``L(register_coco_format)(...)``); [] when the config has none."""
    entries = cfg.dataloader.get("retention", None) or []
    if isinstance(entries, str):
        entries = [entries]
    names = [str(instantiate(entry)) for entry in entries]
    target = cfg.dataloader.test.dataset.names
    for name in names:
        if name == target:
            raise ValueError(f"dataloader.retention names the target test set {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"dataloader.retention names a dataset twice: {names}")
    return names


def retention_config(cfg, name: str):
    """A copy of ``cfg`` whose test loader and evaluator are those of retention set ``name``."""
    copied = copy.deepcopy(cfg)
    copied.dataloader.test.dataset.names = name
    if "evaluator" in copied.dataloader:
        copied.dataloader.evaluator.dataset_name = name
        if "output_dir" in copied.dataloader.evaluator:
            copied.dataloader.evaluator.output_dir = os.path.join(
                cfg.train.output_dir, "inference", f"{RETENTION_PREFIX}_{name}"
            )
    return copied


def retention_results(results: Dict, name: str) -> Dict:
    """``results`` of retention set ``name`` under its key in the evaluation results."""
    return {f"{RETENTION_PREFIX}/{name}": results}
