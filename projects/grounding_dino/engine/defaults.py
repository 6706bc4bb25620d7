"""Helpers of ``train_net.py``: trainer choice, DDP wrapping and the standard hooks."""

import logging
from typing import Callable, List, Mapping, Optional, Tuple

import torch
from detectron2.engine import SimpleTrainer, create_ddp_model, default_writers, hooks
from detectron2.utils import comm
from torch import nn

from ..precision import check_precision
from .hooks import LastGoodCheckpointer
from .launch import is_cpu_device
from .optimizer import plain_param_groups
from .trainer import GroundingAMPTrainer, GroundingTrainer

__all__ = ["train_value", "use_amp", "amp_precision", "build_trainer", "wrap_ddp", "build_hooks"]

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


_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_precision(train_cfg: Mapping) -> Optional[Tuple[str, torch.dtype]]:
    """
    The autocast of training, from ``train.amp``: ``enabled`` is ``True``, ``False``
    (float32) or ``"auto"`` (mixed precision on CUDA, float32 on the CPU, which is logged);
    ``dtype`` is ``"fp16"``, ``"bf16"`` or ``"auto"`` (fp16 on CUDA, as detectron2's
    AMPTrainer; bf16 on the CPU, the only half precision offered there). A config without
    ``amp.dtype`` (written before it existed) means ``"auto"``.

    Returns:
        ``(device_type, dtype)`` for ``torch.autocast`` ("cuda" or "cpu"; float16 or bfloat16),
        or None for float32.

    Raises:
        ValueError: a value other than those; fp16 on the CPU; bf16 on a CPU without native
            bfloat16 unless ``GROUNDING_DINO_ALLOW_EMULATED_BF16=1`` (``--allow-emulated-bf16``)
            asks for it, or on a CUDA device without bfloat16 (:func:`~grounding_dino.
            precision.check_precision`: each names the setting).
    """
    enabled = train_value(train_cfg, "amp.enabled")
    device = train_value(train_cfg, "device")
    on_cpu = is_cpu_device(device)
    if enabled == "auto":
        if on_cpu:
            logger.info("train.amp.enabled=auto on the CPU: training in float32")
            return None
        enabled = True
    if not isinstance(enabled, bool):
        raise ValueError(f"train.amp.enabled must be True, False or 'auto', got {enabled!r}")
    if not enabled:
        return None
    dtype = train_value(train_cfg, "amp").get("dtype", "auto")
    if dtype == "auto":
        dtype = "bf16" if on_cpu else "fp16"
    if dtype not in _AMP_DTYPES:
        raise ValueError(f"train.amp.dtype must be 'fp16', 'bf16' or 'auto', got {dtype!r}")
    try:
        check_precision(dtype, device)
    except ValueError as error:
        raise ValueError(
            f"train.amp.enabled=True with train.amp.dtype={dtype} on train.device={device}: "
            f"{error}"
        ) from None
    return torch.device(device).type, _AMP_DTYPES[dtype]


def use_amp(train_cfg: Mapping) -> bool:
    """Whether training runs with automatic mixed precision (:func:`amp_precision`)."""
    return amp_precision(train_cfg) is not None


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
    :class:`GroundingAMPTrainer` with the autocast of :func:`amp_precision` (CUDA fp16/bf16
    or CPU bf16) when there is one, else :class:`GroundingTrainer`, both with
    ``train.clip_grad``. The optimizer's param groups are made plain Python (see
    :func:`~grounding_dino.engine.optimizer.plain_param_groups`) so checkpoints load safely.
    """
    plain_param_groups(optimizer)
    clip_grad = train_value(train_cfg, "clip_grad")
    precision = amp_precision(train_cfg)
    if precision is not None:
        device_type, dtype = precision
        return GroundingAMPTrainer(
            model,
            data_loader,
            optimizer,
            clip_grad=clip_grad,
            device_type=device_type,
            precision=dtype,
        )
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
