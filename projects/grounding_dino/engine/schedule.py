"""Learning-rate schedule: linear warm-up, then step decay (DINO / Grounding DINO style)."""

import logging
from typing import List, Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

__all__ = ["warmup_step_schedule", "step_milestones"]

logger = logging.getLogger(__name__)


def step_milestones(max_iter: int, steps: Sequence[float]) -> List[int]:
    """
    Iterations at which the learning rate drops.

    Args:
        max_iter: total training iterations.
        steps: fractions of ``max_iter`` in (0, 1), increasing.

    Returns:
        increasing milestones in [1, max_iter - 1]; steps that fall outside (tiny runs) or on
        an earlier milestone are dropped.
    """
    milestones: List[int] = []
    previous = 0.0
    for step in steps:
        if not 0.0 < float(step) < 1.0 or float(step) <= previous:
            raise ValueError(
                f"schedule steps must be increasing fractions of max_iter in (0, 1), got {steps}"
            )
        previous = float(step)
        milestone = int(round(float(step) * max_iter))
        if 0 < milestone < max_iter and (not milestones or milestone > milestones[-1]):
            milestones.append(milestone)
    return milestones


def warmup_step_schedule(
    max_iter: int,
    steps: Sequence[float] = (0.9,),
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
) -> WarmupParamScheduler:
    """
    The learning-rate multiplier for detectron2's ``hooks.LRScheduler`` (``lr_multiplier`` in
    the config): ``warmup_factor`` rising linearly to 1 over ``warmup_iters``, then
    multiplied by ``gamma`` at each step.

    Steps are fractions of ``max_iter``, so overriding ``train.max_iter`` keeps the shape::

        lr_multiplier = L(warmup_step_schedule)(max_iter="${train.max_iter}", steps=[0.9])

    Args:
        max_iter: total iterations (``train.max_iter``).
        steps: fractions of ``max_iter`` where the rate is multiplied by ``gamma``.
        gamma: decay factor per step.
        warmup_iters: iterations of warm-up (clipped to ``max_iter``; 0 disables it).
        warmup_factor: starting multiplier of the warm-up.
        warmup_method: "linear" or "constant".

    Returns:
        a :class:`~detectron2.solver.WarmupParamScheduler` (a function of the training
        progress in [0, 1]).
    """
    max_iter = int(max_iter)
    if max_iter < 1:
        raise ValueError(f"warmup_step_schedule: max_iter must be >= 1, got {max_iter}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_step_schedule: warmup_iters must be >= 0, got {warmup_iters}")
    milestones = step_milestones(max_iter, steps)
    if len(milestones) < len(steps):
        logger.warning(
            f"LR steps {list(steps)} give milestones {milestones} for max_iter={max_iter}; "
            "steps that do not fit were dropped"
        )
    values = [gamma**k for k in range(len(milestones) + 1)]
    if max_iter < len(values):  # fvcore needs num_updates >= number of values
        values, milestones = [1.0], []
    decay = MultiStepParamScheduler(values=values, milestones=milestones, num_updates=max_iter)
    warmup_length = min(int(warmup_iters), max_iter) / max_iter
    return WarmupParamScheduler(decay, warmup_factor, warmup_length, warmup_method)
