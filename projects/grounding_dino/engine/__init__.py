"""Training engine: trainers, hooks, optimizer groups, LR schedule, a CPU-aware launch and the
evaluation of ``train_net.py``."""

from .defaults import build_hooks, build_trainer, train_value, use_amp, wrap_ddp
from .evaluation import (
    EVAL_MAX_DETECTIONS,
    InferenceWithSettings,
    evaluate,
    evaluation_settings,
    write_eval_metrics,
)
from .hooks import LastGoodCheckpointer
from .launch import is_cpu_device, launch
from .optimizer import (
    BACKBONE_PREFIXES,
    TEXT_ENCODER_PREFIXES,
    get_param_groups,
    lr_factor_of,
    plain_param_groups,
)
from .schedule import step_milestones, warmup_step_schedule
from .trainer import GroundingAMPTrainer, GroundingTrainer, clip_gradients, nonfinite_losses

__all__ = [
    "BACKBONE_PREFIXES",
    "EVAL_MAX_DETECTIONS",
    "TEXT_ENCODER_PREFIXES",
    "GroundingAMPTrainer",
    "GroundingTrainer",
    "LastGoodCheckpointer",
    "build_hooks",
    "build_trainer",
    "clip_gradients",
    "evaluate",
    "evaluation_settings",
    "InferenceWithSettings",
    "get_param_groups",
    "is_cpu_device",
    "launch",
    "lr_factor_of",
    "nonfinite_losses",
    "plain_param_groups",
    "step_milestones",
    "train_value",
    "use_amp",
    "warmup_step_schedule",
    "wrap_ddp",
    "write_eval_metrics",
]
