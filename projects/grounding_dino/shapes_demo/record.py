"""
Reuse of the demo job's trained model: a record of the config a model was trained with
(saved in ``model_final.pth``), and the decision whether a new run may reuse that model.
"""

import os
import tempfile
from typing import Dict, List, Tuple

from detectron2.config import LazyConfig
from omegaconf import OmegaConf

from ..convert.checkpoint import load_checkpoint_file

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_RECORD_KEY",
    "IGNORED_CONFIG_KEYS",
    "RUN_FILES",
    "config_record",
    "config_differences",
    "reuse_decision",
]

CHECKPOINT_NAME = "model_final"
CONFIG_RECORD_KEY = "trained_config"  # in model_final.pth: config_record() of its training
# Config keys that do not change the trained model: where the run is written, how often it
# logs, keeps checkpoints and evaluates during training.
IGNORED_CONFIG_KEYS = (
    "train.output_dir",
    "train.log_period",
    "train.eval_period",
    "train.checkpointer.period",
    "train.checkpointer.max_to_keep",
)
# Files of a run that training again replaces.
RUN_FILES = (CHECKPOINT_NAME + ".pth", "config.yaml", "metrics.json", "run_info.json")


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
