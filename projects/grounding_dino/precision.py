"""
Precision modes of inference: ``fp32`` (default), ``bf16`` and ``fp16``, one place for the
predictor, the demo CLI, the web demo, the labelling CLI and ``tools/evaluate_precision.py``.

- ``fp32``: plain float32.
- ``bf16``: ``torch.autocast`` with bfloat16, on the CPU and on CUDA. Weights stay float32;
  matrix multiplies and convolutions run in bfloat16.
- ``fp16``: ``torch.autocast`` with float16, on CUDA only. On the CPU it is refused
  (:class:`ValueError`): CPU kernels for float16 are slower than float32 here (see
  docs/deployment.md, "Precision modes"), and bf16 gives the same memory saving with float32's
  range.

Whatever the mode, the outputs (boxes, scores, token scores) are returned in float32
(:func:`outputs_to_fp32`).
"""

import contextlib
import functools
import logging
from typing import Dict, List, Union

import torch
from detectron2.structures import Boxes, Instances

__all__ = [
    "PRECISIONS",
    "DTYPE_HELP",
    "add_dtype_argument",
    "check_precision",
    "precision_context",
    "outputs_to_fp32",
    "cpu_has_native_bf16",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
"""The values of ``dtype=`` / ``--dtype``."""

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

DTYPE_HELP = (
    "precision: fp32, bf16 (autocast; CPU or CUDA) or fp16 (autocast; CUDA only); "
    "see docs/deployment.md#precision-modes"
)


def add_dtype_argument(add_argument) -> None:
    """Adds the command lines' ``--dtype {fp32,bf16,fp16}`` (default fp32) through
    ``add_argument`` (an ``argparse`` parser's or group's ``add_argument``)."""
    add_argument("--dtype", choices=PRECISIONS, default="fp32", help=DTYPE_HELP)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` in
    ``/proc/cpuinfo``); False where this cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type


def check_precision(dtype: str, device: Union[str, torch.device]) -> str:
    """
    Validates a precision mode for a device, logging a warning where it is known to be slow.

    Args:
        dtype: one of :data:`PRECISIONS`.
        device: the model's device ("cpu", "cuda", "cuda:1", ...).

    Returns:
        ``dtype``.

    Raises:
        ValueError: an unknown mode, fp16 on the CPU, or a mode on a device other than the CPU
            and CUDA.
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r} is not a precision mode; choose one of {PRECISIONS}")
    kind = _device_type(device)
    if dtype == "fp32":
        return dtype
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"dtype={dtype!r} needs a CPU or CUDA device, the model is on {device}")
    if dtype == "fp16" and kind == "cpu":
        raise ValueError(
            "dtype='fp16' is not offered on the CPU: float16 CPU kernels are slower than "
            "float32 (see docs/deployment.md#precision-modes). Use dtype='bf16' (the same memory "
            "per value, float32's range) or 'fp32', or run on CUDA"
        )
    if dtype == "bf16" and kind == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "dtype='bf16' on a CPU without native bfloat16 (no avx512_bf16/amx_bf16 flag in "
            "/proc/cpuinfo): bfloat16 is emulated and may be slower than fp32; compare with "
            "tools/evaluate_precision.py"
        )
    if dtype == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bf16': the CUDA device {device} does not support bfloat16")
    return dtype


def precision_context(dtype: str, device: Union[str, torch.device]):
    """
    The context to run the model in: ``torch.autocast`` for bf16/fp16, nothing for fp32.

    Args:
        dtype: a mode accepted by :func:`check_precision`.
        device: the model's device.
    """
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=_AUTOCAST_DTYPES[dtype])


def _instances_to_fp32(instances: Instances) -> Instances:
    for name, value in instances.get_fields().items():
        if isinstance(value, Boxes) and value.tensor.is_floating_point():
            instances.set(name, Boxes(value.tensor.float()))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            instances.set(name, value.float())
    return instances


def outputs_to_fp32(outputs: Union[Dict, List[Dict]]):
    """
    Casts the floating-point fields of the ``"instances"`` of model outputs to float32 (in
    place; integer fields such as ``pred_classes`` are left as they are).

    Args:
        outputs: a ``{"instances": Instances, ...}`` dict or a list of them.

    Returns:
        ``outputs``.
    """
    for output in outputs if isinstance(outputs, list) else [outputs]:
        if "instances" in output:
            _instances_to_fp32(output["instances"])
    return outputs
