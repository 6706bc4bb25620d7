"""
Plain weights from a LoRA run: the base checkpoint with the adapter folded in
(``python -m grounding_dino.finetune merge-lora``). The result is an ordinary
``{"model": state_dict}`` checkpoint of the config's model: the predictor, ``train_net.py
--eval-only``, the ONNX export and the other exports load it strictly like any checkpoint.
"""

import logging
import os
from typing import Dict, Optional

import torch
from detectron2.config import instantiate
from torch import nn

from ..checkpoint import GroundingDINOCheckpointer, compare_state_dict
from ..convert.checkpoint import load_checkpoint_file
from ..io.atomic import atomic_output
from .lora import AdapterWeights, add_lora, merge_lora

__all__ = ["read_lora_record", "load_lora_model", "merge_adapter_checkpoint", "save_new"]

logger = logging.getLogger(__name__)


def read_lora_record(adapter: str) -> Dict:
    """The ``"lora"`` record of an adapter checkpoint (settings and base checkpoint)."""
    data = load_checkpoint_file(adapter)
    if "lora" not in data:
        raise ValueError(
            f"{adapter} is not a LoRA adapter checkpoint (no 'lora' record); it was not "
            "written by a run with train.lora.rank > 0"
        )
    return dict(data["lora"])


def load_lora_model(cfg, adapter: str, base: Optional[str] = None):
    """
    The config's model with the base weights and the adapter, both loaded strictly.

    Args:
        cfg: the lazy config of the run (its ``model``).
        adapter: an adapter checkpoint of a LoRA run.
        base: the base weights; default: the checkpoint the run was trained on (its record).

    Returns:
        (model with adapters, peft tuner, base path).
    """
    record = read_lora_record(adapter)
    base = base or record["base_checkpoint"]
    if not os.path.isfile(base):
        raise FileNotFoundError(
            f"the base checkpoint {base} of {adapter} does not exist; pass it with --base"
        )
    model = instantiate(cfg.model)
    GroundingDINOCheckpointer(model).resume_or_load(base, resume=False, convert_sources=True)
    settings = {k: v for k, v in record.items() if k != "base_checkpoint"}
    tuner = add_lora(model, settings)
    GroundingDINOCheckpointer(AdapterWeights(model)).load(adapter)
    return model, tuner, base


def merge_adapter_checkpoint(cfg, adapter: str, base: Optional[str] = None) -> nn.Module:
    """
    :func:`load_lora_model`, then the adapters folded into the weights (peft); the result is
    checked to have exactly the keys and shapes of the config's plain model.
    """
    model, tuner, _ = load_lora_model(cfg, adapter, base)
    merged = merge_lora(tuner).eval()
    mismatch = compare_state_dict(instantiate(cfg.model), merged.state_dict())
    if mismatch:
        raise RuntimeError(f"merged weights do not fit the plain model: {mismatch.describe()}")
    return merged


def save_new(state: Dict, path: str) -> None:
    """Writes ``{"model": state}`` to ``path``, which must not exist (never overwritten)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of {path} does not exist")
    # replace=False: a file created meanwhile is not replaced either; a failed write leaves none.
    with atomic_output(path, replace=False) as temporary:
        torch.save({"model": state}, temporary)
