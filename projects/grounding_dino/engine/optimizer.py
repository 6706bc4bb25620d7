"""Optimizer parameter groups: lower learning rates for the image backbone and BERT."""

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.solver import get_default_optimizer_params
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

__all__ = [
    "BACKBONE_PREFIXES",
    "TEXT_ENCODER_PREFIXES",
    "get_param_groups",
    "lr_factor_of",
    "plain_param_groups",
]

logger = logging.getLogger(__name__)

# Parameter-name prefixes that get the backbone / text-encoder multipliers: the image body
# (``backbone.*``) and BERT (``text_encoder.bert.*``). As in the official training
# (Open-GroundingDino's ``lr_backbone_names = ["backbone.0", "bert"]``), the input projections
# (``neck.*``) and BERT's ``feat_map`` train at the full learning rate.
BACKBONE_PREFIXES = ("backbone.",)
TEXT_ENCODER_PREFIXES = ("text_encoder.bert.",)


def lr_factor_of(name: str, multipliers: Mapping[str, float]) -> float:
    """
    Learning-rate multiplier of one parameter.

    Args:
        name: full parameter name, e.g. "backbone.layers.0.blocks.0.attn.qkv.weight".
        multipliers: {name prefix: multiplier}; the longest matching prefix wins.

    Returns:
        the multiplier (1.0 when no prefix matches).
    """
    best, factor = -1, 1.0
    for prefix, value in multipliers.items():
        if name.startswith(prefix) and len(prefix) > best:
            best, factor = len(prefix), float(value)
    return factor


def get_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    backbone_lr_multiplier: float,
    text_encoder_lr_multiplier: float,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    backbone_prefixes: Sequence[str] = BACKBONE_PREFIXES,
    text_encoder_prefixes: Sequence[str] = TEXT_ENCODER_PREFIXES,
    lr_multipliers: Optional[Mapping[str, float]] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """
    Parameter groups for the optimizer, built by detectron2's
    :func:`~detectron2.solver.get_default_optimizer_params` with a name-based learning-rate
    factor. Every value is plain data, so a LazyConfig holding this call saves as YAML::

        optimizer = L(torch.optim.AdamW)(
            params=L(get_param_groups)(
                base_lr="${..lr}", backbone_lr_multiplier=0.1, text_encoder_lr_multiplier=0.1
            ),
            lr=1e-4,
            weight_decay=1e-4,
        )

    Frozen parameters (``requires_grad=False``) are left out; shared parameters appear once.

    Args:
        model: the model (unwrapped, not DistributedDataParallel).
        base_lr: learning rate of parameters without a multiplier (``optimizer.lr``).
        weight_decay: weight decay of every group (None: the optimizer's).
        weight_decay_norm: weight decay of normalisation layers (None: as the others).
        backbone_lr_multiplier: multiplier of parameters under ``backbone_prefixes``.
        text_encoder_lr_multiplier: multiplier of parameters under ``text_encoder_prefixes``.
        backbone_prefixes: parameter-name prefixes of the image backbone.
        text_encoder_prefixes: parameter-name prefixes of the text encoder.
        lr_multipliers: more {name prefix: multiplier} pairs (the longest prefix wins).
        overrides: detectron2's per-parameter-name hyper-parameter overrides.

    Returns:
        list of param-group dicts with "params", "lr" and maybe "weight_decay".
    """
    if base_lr is None or float(base_lr) <= 0:
        raise ValueError(f"get_param_groups: base_lr must be a positive number, got {base_lr!r}")
    multipliers = {p: backbone_lr_multiplier for p in backbone_prefixes}
    multipliers.update({p: text_encoder_lr_multiplier for p in text_encoder_prefixes})
    multipliers.update(dict(lr_multipliers or {}))
    for prefix, value in multipliers.items():
        if float(value) < 0:
            raise ValueError(f"get_param_groups: multiplier of {prefix!r} is negative: {value}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    all_names = [n for n, _ in model.named_parameters()]
    for prefix in multipliers:
        if not any(n.startswith(prefix) for n in all_names):
            logger.warning(f"get_param_groups: no parameter starts with {prefix!r}")
        elif not any(n.startswith(prefix) for n in names):
            logger.info(f"get_param_groups: the parameters under {prefix!r} are frozen")

    def factor(name: str) -> float:
        # ``named_modules`` gives the root module the name "", so its parameters arrive
        # with a leading ".".
        return lr_factor_of(name.lstrip("."), multipliers)

    groups = get_default_optimizer_params(
        model,
        base_lr=float(base_lr),
        weight_decay=weight_decay,
        weight_decay_norm=weight_decay_norm,
        lr_factor_func=factor,
        overrides=overrides,
    )
    counts: Dict[float, int] = {}
    for group in groups:
        counts[group["lr"]] = counts.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    summary = ", ".join(f"lr {lr:.3g}: {n / 1e6:.2f}M" for lr, n in sorted(counts.items()))
    logger.info(f"Optimizer parameter groups ({len(groups)}): {summary}")
    return groups


def plain_param_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """
    Replaces OmegaConf containers in the optimizer's param groups by plain Python values.

    ``instantiate`` passes config lists as ``ListConfig`` (e.g. AdamW's ``betas``); they would
    end up in every checkpoint, which ``torch.load(weights_only=True)`` then refuses on
    ``--resume``. Lists become tuples, dicts become dicts. Returns the same optimizer.
    """
    for group in optimizer.param_groups:
        for key, value in list(group.items()):
            if isinstance(value, ListConfig):
                group[key] = tuple(OmegaConf.to_container(value, resolve=True))
            elif isinstance(value, DictConfig):
                group[key] = OmegaConf.to_container(value, resolve=True)
    for key, value in list(optimizer.defaults.items()):
        if isinstance(value, (ListConfig, DictConfig)):
            container = OmegaConf.to_container(value, resolve=True)
            optimizer.defaults[key] = (
                tuple(container) if isinstance(value, ListConfig) else container
            )
    return optimizer
