"""
Fine-tuning recipes of a config, applied by the training driver before the optimizer is built:

* ``train.freeze``: glob patterns of parameter names to freeze (``fnmatch``), e.g.
  ``["backbone.*"]`` (the image backbone) or ``["enhancer.layers.*.fusion.*"]`` (the
  image-text fusion layers). Frozen parameters get ``requires_grad=False`` and so no optimizer
  state; their modules keep their training mode (dropout, drop-path).
* ``train.lora``: LoRA adapters (``grounding_dino.finetune.lora``) with ``rank > 0``: the base
  weights (``train.init_checkpoint``, required) are loaded first, then the adapters are added
  and everything else is frozen; the run's checkpoints hold only the adapter.

A config without these keys trains what the model leaves trainable, as before.
"""

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

from torch import nn

from ..checkpoint import GroundingDINOCheckpointer
from ..finetune.lora import AdapterWeights, add_lora, check_lora_settings, lora_record

__all__ = ["Recipe", "freeze_parameters", "prepare_finetuning", "trainable_parameters"]

logger = logging.getLogger(__name__)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> int:
    """
    Sets ``requires_grad=False`` on every parameter whose name matches one of ``patterns``
    (``fnmatch``: ``*`` also matches dots). A pattern that matches no parameter is an error.

    Returns:
        the number of parameters frozen.
    """
    names = [n for n, _ in model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not matched:
            tops = sorted({n.split(".", 1)[0] for n in names})
            raise ValueError(
                f"train.freeze: {pattern!r} matches no parameter name (top-level modules: "
                f"{tops}; e.g. 'backbone.*', 'enhancer.layers.*.fusion.*')"
            )
        parameters = dict(model.named_parameters())
        count = 0
        for name in matched:
            if parameters[name].requires_grad:
                parameters[name].requires_grad_(False)
                count += parameters[name].numel()
        logger.info(f"train.freeze {pattern!r}: froze {len(matched)} tensors, {count} parameters")
        frozen += count
    return frozen


@dataclass
class Recipe:
    """What :func:`prepare_finetuning` did: the module the checkpointer saves (the model, or
    its adapter weights), extra checkpoint entries, and whether the base weights are loaded."""

    checkpoint_model: Optional[nn.Module] = None
    checkpoint_extra: Dict = field(default_factory=dict)
    base_loaded: bool = False


def prepare_finetuning(cfg, model: nn.Module, partial: Callable[[], object]) -> Recipe:
    """
    Applies ``train.freeze`` and ``train.lora`` of ``cfg`` to ``model`` (unwrapped, on its
    device). ``partial``: returns the ``train.init_partial`` policy, asked only when LoRA loads
    the base weights. Logs the trainable parameters.
    """
    patterns = list(cfg.train.get("freeze", None) or [])
    settings = check_lora_settings(cfg.train.get("lora", None) or {})
    recipe = Recipe()
    if settings["rank"]:
        if patterns:
            raise ValueError(
                f"train.freeze={patterns} and train.lora (rank {settings['rank']}) exclude each "
                "other: LoRA already freezes every weight but its adapters"
            )
        base = cfg.train.init_checkpoint
        if not base:
            raise ValueError("train.lora needs base weights: set train.init_checkpoint")
        # The base weights go in before the adapters wrap the layers (which renames them).
        GroundingDINOCheckpointer(model).resume_or_load(
            base, resume=False, partial=partial(), convert_sources=True
        )
        add_lora(model, settings)
        recipe = Recipe(AdapterWeights(model), {"lora": lora_record(settings, base)}, True)
    elif patterns:
        freeze_parameters(model, patterns)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"Trainable parameters: {trainable_parameters(model)} of {total}")
    return recipe
