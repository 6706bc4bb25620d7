"""Training engine: the driver of ``train_net.py`` and the demo job (:mod:`.driver`), trainers,
hooks, optimizer groups, LR schedule, a CPU-aware launch and the evaluation."""

from .defaults import amp_precision, build_hooks, build_trainer, train_value, use_amp, wrap_ddp
from .driver import check_init_checkpoint, do_eval_only, do_test, do_train, init_partial
from .evaluation import (
    EVAL_MAX_DETECTIONS,
    InferenceWithSettings,
    evaluate,
    evaluation_settings,
    write_eval_metrics,
)
from .hooks import LastGoodCheckpointer, ProgressPrinter, format_duration
from .launch import is_cpu_device, launch, launch_from_args
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
    "ProgressPrinter",
    "build_hooks",
    "build_trainer",
    "check_init_checkpoint",
    "clip_gradients",
    "do_eval_only",
    "do_test",
    "do_train",
    "evaluate",
    "evaluation_settings",
    "format_duration",
    "InferenceWithSettings",
    "get_param_groups",
    "init_partial",
    "is_cpu_device",
    "launch",
    "launch_from_args",
    "lr_factor_of",
    "nonfinite_losses",
    "plain_param_groups",
    "step_milestones",
    "train_value",
    "use_amp",
    "amp_precision",
    "warmup_step_schedule",
    "wrap_ddp",
    "write_eval_metrics",
]
