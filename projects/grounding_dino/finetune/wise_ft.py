"""
Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): interpolations between the starting
checkpoint and the fine-tuned one, ``(1 - alpha) * base + alpha * finetuned``, each evaluated
on the target test set and the retention sets (``dataloader.retention``) of a config, drawn as
a trade-off curve (``python -m grounding_dino.finetune wise-ft``).

alpha 0 is the base checkpoint and alpha 1 the fine-tuned one, exactly (the formula gives the
endpoints' own values). Both checkpoints must hold the config's model exactly (same keys and
shapes); integer tensors (step counters) must be equal in both.
"""

import json
import logging
import os
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.config import instantiate
from detectron2.evaluation.testing import flatten_results_dict

from ..checkpoint import CheckpointMismatchError, compare_state_dict
from ..convert.checkpoint import load_checkpoint_file
from ..engine.driver import do_test
from ..engine.retention import RETENTION_PREFIX, retention_names
from ..io.atomic import atomic_file
from .merge import save_new

__all__ = [
    "interpolate_state_dicts",
    "load_model_state",
    "choose_alpha",
    "run_wise_ft",
    "alpha_file_name",
]

logger = logging.getLogger(__name__)


def load_model_state(path: str, model) -> Dict[str, torch.Tensor]:
    """The model state of checkpoint ``path``, checked to match ``model`` exactly."""
    data = load_checkpoint_file(path)
    if "lora" in data:
        raise CheckpointMismatchError(
            f"{path} holds only a LoRA adapter; merge it first: python -m "
            f"grounding_dino.finetune merge-lora CONFIG {path} OUT.pth"
        )
    state = dict(data["model"] if "model" in data else data)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    mismatch = compare_state_dict(model, state)
    if mismatch:
        raise CheckpointMismatchError(
            f"{path} does not hold the config's model: {mismatch.describe()}"
        )
    for key in mismatch.computed:
        del state[key]
    return state


def interpolate_state_dicts(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> Dict[str, torch.Tensor]:
    """
    ``(1 - alpha) * base + alpha * finetuned`` for every floating-point tensor (in its dtype);
    other tensors must be equal in both and are copied.

    Raises:
        ValueError: the two have different keys, shapes or dtypes, or different integer
            tensors.
    """
    if set(base) != set(finetuned):
        raise ValueError(
            "the checkpoints hold different keys: " f"{sorted(set(base) ^ set(finetuned))[:5]}"
        )
    result = {}
    for key, a in base.items():
        b = finetuned[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{key}: base {tuple(a.shape)} {a.dtype}, fine-tuned {tuple(b.shape)} {b.dtype}"
            )
        if a.is_floating_point():
            result[key] = (1.0 - alpha) * a + alpha * b
        elif torch.equal(a, b):
            result[key] = a.clone()
        else:
            raise ValueError(f"{key}: integer tensors differ between the checkpoints")
    return result


def alpha_file_name(alpha: float) -> str:
    return f"wise_ft_alpha{alpha:.2f}.pth"


def choose_alpha(rows: Sequence[Mapping], max_target_loss: float) -> Optional[Mapping]:
    """
    The row that keeps the most retention AP among those whose target AP is at most
    ``max_target_loss`` points below the fine-tuned model's (the row with the largest alpha);
    ties go to the larger alpha. None when no row qualifies.
    """
    finetuned = max(rows, key=lambda r: r["alpha"])
    allowed = [r for r in rows if r["target"] >= finetuned["target"] - max_target_loss]
    if not allowed:
        return None
    return max(allowed, key=lambda r: (r["retention"], r["alpha"]))


def _scores(results: Mapping, metric: str, retention: List[str]) -> Dict:
    flat = flatten_results_dict(results)
    target = flat.get(metric)
    if target is None:
        raise KeyError(f"the target evaluation has no {metric} (it has {sorted(flat)[:8]})")
    per_set = {name: flat[f"{RETENTION_PREFIX}/{name}/{metric}"] for name in retention}
    mean = sum(per_set.values()) / len(per_set) if per_set else float("nan")
    return {"target": float(target), "retention": float(mean), "per_set": per_set}


def run_wise_ft(
    cfg,
    base: str,
    finetuned: str,
    alphas: Sequence[float],
    output_dir: str,
    metric: str = "bbox/AP50",
    max_target_loss: float = 1.0,
) -> Dict:
    """
    Writes ``output_dir/wise_ft_alpha<a>.pth`` for each alpha, evaluates each with
    :func:`~grounding_dino.engine.do_test` (target and ``dataloader.retention``), and writes
    ``wise_ft.json``, ``wise_ft.md`` (the table) and ``wise_ft.png`` (the curve). Nothing in
    ``output_dir`` is overwritten: existing output files stop the run before any work.

    Returns:
        {"rows": [{"alpha", "target", "retention", "per_set"}...], "chosen": row or None, ...}
    """
    alphas = sorted({float(a) for a in alphas})
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be in [0, 1], got {list(alphas)}")
    retention = retention_names(cfg)
    if not retention:
        raise ValueError(
            "the config names no retention set (dataloader.retention): nothing to trade "
            "the target against; add e.g. 'dataloader.retention=[shapes_val]'"
        )
    os.makedirs(output_dir, exist_ok=True)
    outputs = [alpha_file_name(a) for a in alphas] + ["wise_ft.json", "wise_ft.md", "wise_ft.png"]
    existing = [name for name in outputs if os.path.exists(os.path.join(output_dir, name))]
    if existing:
        raise FileExistsError(
            f"{output_dir} already holds {existing}; choose another --output (nothing is "
            "overwritten)"
        )
    model = instantiate(cfg.model).to(cfg.train.device).eval()
    base_state = load_model_state(base, model)
    finetuned_state = load_model_state(finetuned, model)
    rows = []
    for alpha in alphas:
        state = interpolate_state_dicts(base_state, finetuned_state, alpha)
        path = os.path.join(output_dir, alpha_file_name(alpha))
        save_new(state, path)
        model.load_state_dict(state, strict=True)
        logger.info(f"WiSE-FT alpha {alpha:.2f}: evaluating {path}")
        scores = _scores(do_test(cfg, model), metric, retention)
        rows.append(dict(alpha=alpha, checkpoint=path, **scores))
        logger.info(
            f"alpha {alpha:.2f}: target {metric} {scores['target']:.1f}, retention "
            f"{scores['retention']:.1f}"
        )
    from .report import draw_curve, table

    summary = dict(
        base=base,
        finetuned=finetuned,
        metric=metric,
        retention_sets=retention,
        max_target_loss=max_target_loss,
        rows=rows,
        chosen=choose_alpha(rows, max_target_loss),
    )
    with atomic_file(os.path.join(output_dir, "wise_ft.md"), replace=False) as f:
        f.write(table(summary) + "\n")
    draw_curve(summary, os.path.join(output_dir, "wise_ft.png"))
    with atomic_file(os.path.join(output_dir, "wise_ft.json"), replace=False) as f:
        json.dump(summary, f, indent=2)
    return summary
