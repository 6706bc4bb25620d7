"""Helpers of ``train_net.py``: trainer choice, DDP wrapping and the standard hooks."""

import logging
from typing import Callable, List, Mapping, Optional

from detectron2.engine import SimpleTrainer, create_ddp_model, default_writers, hooks
from detectron2.utils import comm
from torch import nn

from .hooks import LastGoodCheckpointer
from .launch import is_cpu_device
from .optimizer import plain_param_groups
from .trainer import GroundingAMPTrainer, GroundingTrainer

__all__ = ["train_value", "use_amp", "build_trainer", "wrap_ddp", "build_hooks"]

logger = logging.getLogger(__name__)


def train_value(train_cfg: Mapping, key: str):
    """
    ``train.<key>`` of the config (``key`` may be dotted: "amp.enabled").

    Raises:
        KeyError: naming ``train.<key>`` when the config does not set it (no silent default).
    """
    node = train_cfg
    parts = key.split(".")
    for index, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(["train"] + parts[: index + 1])
            raise KeyError(
                f"The config does not set {where} (needed by train_net); add it to the config "
                f"or as an override {'.'.join(['train'] + parts)}=..."
            )
        node = node[part]
    return node


def use_amp(train_cfg: Mapping) -> bool:
    """
    Whether training runs with CUDA automatic mixed precision, from ``train.amp.enabled``:
    ``True`` (CUDA only), ``False`` (float32) or ``"auto"`` (mixed precision on CUDA, float32
    on the CPU, which is logged).

    Raises:
        ValueError: ``True`` with a CPU ``train.device`` (the trainer's mixed precision,
            autocast with a gradient scaler, is CUDA's; it is not switched off without a word),
            or a value other than the three.
    """
    enabled = train_value(train_cfg, "amp.enabled")
    on_cpu = is_cpu_device(train_value(train_cfg, "device"))
    if enabled == "auto":
        if on_cpu:
            logger.info("train.amp.enabled=auto on the CPU: training in float32")
        return not on_cpu
    if not isinstance(enabled, bool):
        raise ValueError(f"train.amp.enabled must be True, False or 'auto', got {enabled!r}")
    if enabled and on_cpu:
        raise ValueError(
            "train.amp.enabled=True but train.device is the CPU: the trainer's mixed precision "
            "(CUDA autocast with a gradient scaler) needs CUDA. Set train.amp.enabled=False "
            "(float32) or train.amp.enabled=auto (mixed precision on CUDA, float32 on the CPU)"
        )
    return enabled


def wrap_ddp(model: nn.Module, device: str, **ddp_kwargs) -> nn.Module:
    """
    :func:`~detectron2.engine.create_ddp_model` that also takes CPU models (gloo): a CPU
    module must not get ``device_ids``.

    Args:
        model: the model, already on ``device``.
        device: ``train.device``.
        ddp_kwargs: ``train.ddp`` (``broadcast_buffers``, ``find_unused_parameters``,
            ``fp16_compression``).
    """
    if comm.get_world_size() > 1 and is_cpu_device(device):
        ddp_kwargs = {**ddp_kwargs, "device_ids": None}
        if ddp_kwargs.get("fp16_compression"):
            logger.info("train.ddp.fp16_compression is ignored on the CPU")
            ddp_kwargs["fp16_compression"] = False
    return create_ddp_model(model, **ddp_kwargs)


def build_trainer(train_cfg: Mapping, model: nn.Module, data_loader, optimizer) -> SimpleTrainer:
    """
    :class:`GroundingAMPTrainer` when :func:`use_amp`, else :class:`GroundingTrainer`, both
    with ``train.clip_grad``. The optimizer's param groups are made plain Python (see
    :func:`~grounding_dino.engine.optimizer.plain_param_groups`) so checkpoints load safely.
    """
    plain_param_groups(optimizer)
    clip_grad = train_value(train_cfg, "clip_grad")
    if use_amp(train_cfg):
        return GroundingAMPTrainer(model, data_loader, optimizer, clip_grad=clip_grad)
    return GroundingTrainer(model, data_loader, optimizer, clip_grad=clip_grad)


def build_hooks(
    train_cfg: Mapping,
    lr_scheduler,
    checkpointer,
    eval_function: Optional[Callable[[], Mapping]],
) -> List[Optional[hooks.HookBase]]:
    """
    The hooks of detectron2's ``lazyconfig_train_net.py`` plus :class:`LastGoodCheckpointer`:
    iteration timer (ETA), LR scheduler, checkpoints every ``train.checkpointer.period``
    iterations (``<= 0``: only ``model_final.pth`` after the last), evaluation every
    ``train.eval_period`` and the console / ``metrics.json`` / TensorBoard writers every
    ``train.log_period``. Checkpoint and writer hooks run on the main process only.

    Args:
        train_cfg: the ``train`` config node.
        lr_scheduler: a param scheduler (``lr_multiplier``) or an LR scheduler.
        checkpointer: the trainer's checkpointer.
        eval_function: returns the evaluation results; None: no evaluation hook.
    """
    main = comm.is_main_process()
    checkpoints = dict(train_value(train_cfg, "checkpointer"))
    if checkpoints["period"] <= 0:  # only model_final.pth, after the last iteration
        checkpoints["period"] = int(train_value(train_cfg, "max_iter")) + 1
    result: List[Optional[hooks.HookBase]] = [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=lr_scheduler),
        hooks.PeriodicCheckpointer(checkpointer, **checkpoints) if main else None,
        LastGoodCheckpointer(checkpointer) if train_value(train_cfg, "save_last_good") else None,
    ]
    if eval_function is not None:
        result.append(hooks.EvalHook(train_value(train_cfg, "eval_period"), eval_function))
    if main:
        output_dir = train_value(train_cfg, "output_dir")
        writers = default_writers(output_dir, train_value(train_cfg, "max_iter"))
        result.append(hooks.PeriodicWriter(writers, period=train_value(train_cfg, "log_period")))
    return result
