"""
Learning-rate schedule (``lr_multiplier``): linear warm-up, then step decay. Steps are
fractions of ``train.max_iter``, so an override of ``train.max_iter`` keeps the schedule's
shape. Used as ``from .common.schedule import lr_multiplier``.
"""

from detectron2.config import LazyCall as L

from grounding_dino.engine import warmup_step_schedule

lr_multiplier = L(warmup_step_schedule)(
    max_iter="${train.max_iter}",
    steps=[11 / 12],  # one drop by gamma at 11/12 of training (DINO's 12-epoch "1x": epoch 11)
    gamma=0.1,
    warmup_iters=1000,
    warmup_factor=0.001,
)
