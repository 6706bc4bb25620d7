"""
Precision modes of inference: ``fp32`` (default), ``bf16`` and ``fp16``, one place for the
predictor, the demo CLI, the web demo, the labelling CLI and ``tools/evaluate_precision.py``.

- ``fp32``: plain float32.
- ``bf16``: ``torch.autocast`` with bfloat16, on the CPU and on CUDA. Weights stay float32;
  matrix multiplies and convolutions run in bfloat16. On a CPU without native bfloat16
  (:func:`cpu_has_native_bf16`: AVX2-only CPUs such as AMD Zen 3) it is emulated and tens of
  times slower than fp32, so it is refused (:class:`ValueError`) unless asked for with
  ``allow_emulated_bf16=True`` or the environment variable
  ``GROUNDING_DINO_ALLOW_EMULATED_BF16=1`` (which every command line reads).
- ``fp16``: ``torch.autocast`` with float16, on CUDA only. On the CPU it is refused
  (:class:`ValueError`): CPU kernels for float16 are slower than float32 here (see
  docs/deployment.md, "Precision modes"), and bf16 gives the same memory saving with float32's
  range.

Whatever the mode, the outputs (boxes, scores, token scores) are returned in float32
(:func:`outputs_to_fp32`).
"""

import argparse
import contextlib
import functools
import logging
import os
import platform
from typing import Dict, List, Union

import torch
from detectron2.structures import Boxes, Instances

from .devices import AUTO_DEVICE, resolve_device

__all__ = [
    "PRECISIONS",
    "DTYPE_HELP",
    "add_dtype_argument",
    "add_allow_emulated_bf16_argument",
    "check_precision",
    "precision_context",
    "outputs_to_fp32",
    "cpu_has_native_bf16",
    "CPU_FEATURES",
    "describe_cpu",
    "ALLOW_EMULATED_BF16_ENV",
    "emulated_bf16_allowed",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
"""The values of ``dtype=`` / ``--dtype``."""

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

DTYPE_HELP = (
    "precision: fp32, bf16 (autocast; CPU or CUDA) or fp16 (autocast; CUDA only); "
    "see docs/deployment.md#precision-modes"
)


class _AllowEmulatedBf16(argparse.Action):
    """``--allow-emulated-bf16``: sets :data:`ALLOW_EMULATED_BF16_ENV`, which
    :func:`check_precision` reads wherever the command builds its model (its worker processes
    included)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        os.environ[ALLOW_EMULATED_BF16_ENV] = "1"


def add_dtype_argument(add_argument) -> None:
    """Adds the command lines' ``--dtype {fp32,bf16,fp16}`` (default fp32) and
    ``--allow-emulated-bf16`` through ``add_argument`` (an ``argparse`` parser's or group's
    ``add_argument``)."""
    add_argument("--dtype", choices=PRECISIONS, default="fp32", help=DTYPE_HELP)
    add_allow_emulated_bf16_argument(add_argument)


def add_allow_emulated_bf16_argument(add_argument) -> None:
    """Adds ``--allow-emulated-bf16`` alone (``train_net.py``, whose precision is the config's
    ``train.amp``)."""
    add_argument(
        "--allow-emulated-bf16",
        action=_AllowEmulatedBf16,
        help="run --dtype bf16 on a CPU without native bfloat16 (emulated: tens of times slower "
        f"than fp32; refused without this flag or {ALLOW_EMULATED_BF16_ENV}=1)",
    )


ALLOW_EMULATED_BF16_ENV = "GROUNDING_DINO_ALLOW_EMULATED_BF16"
"""Set to 1 to run ``dtype='bf16'`` on a CPU without native bfloat16 (:func:`check_precision`)."""

# What one 800x1333 Swin-T call took on an AVX2-only CPU (AMD Zen 3, issue 32): the orders of
# magnitude the refusal gives.
_EMULATED_BF16_MESSAGE = (
    "dtype='bf16' on this CPU would be emulated: it has no native bfloat16 ({why}). Emulated "
    "bf16 is tens of times slower than fp32: one 800x1333 image takes minutes instead of "
    "seconds (225 s against 5.5 s, 41x, measured on an AVX2-only AMD Zen 3). Use dtype='fp32' "
    "(--dtype fp32). To run emulated bf16 anyway, pass allow_emulated_bf16=True or set "
    f"{ALLOW_EMULATED_BF16_ENV}=1 (see docs/deployment.md#precision-modes)"
)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The instruction sets :func:`describe_cpu` reports: AVX2 only (e.g. AMD Zen 3) trains about
1.8x slower than AVX-512, and bfloat16 is native only with ``avx512_bf16`` or ``amx_bf16``."""

_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe_cpu() -> str:
    """
    One line on this process's CPU: its model, which of :data:`CPU_FEATURES` ``/proc/cpuinfo``
    lists, the kernels torch picked (``ATEN_CPU_CAPABILITY``), the variables that hold torch,
    oneDNN or MKL below the CPU's instruction sets, and whether bfloat16 is native. E.g.
    ``AMD EPYC 7B13: avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 no; torch kernels AVX2;
    bfloat16 emulated``.
    """
    flags = _cpu_flags()
    if flags:
        found = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in CPU_FEATURES)
    else:
        found = "instruction sets unknown (no flags in /proc/cpuinfo)"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    limits = [f"{name}={os.environ[name]}" for name in _ISA_LIMITS if os.environ.get(name)]
    held = f" (held by {', '.join(limits)})" if limits else ""
    bf16 = "native" if cpu_has_native_bf16() else "emulated"
    return f"{cpu_model_name()}: {found}; torch kernels {capability}{held}; bfloat16 {bf16}"


def _onednn_allows_bf16() -> bool:
    """False when ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN (torch's CPU matrix multiplies) below the
    ISAs with bfloat16 instructions (e.g. ``AVX2``, ``AVX512_CORE``)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    return isa in ("", "ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa


def _no_native_bf16_reason() -> str:
    """Why this process has no native bfloat16 on the CPU ("" when it has)."""
    flags = _cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "no avx512_bf16 or amx_bf16 flag in /proc/cpuinfo"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")()
    if not str(capability).upper().startswith("AVX512"):
        return f"torch runs with CPU capability {capability} (ATEN_CPU_CAPABILITY)"
    if not _onednn_allows_bf16():
        return f"oneDNN is limited to ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}"
    return ""


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this process computes bfloat16 natively on the CPU: the CPU has
    ``avx512_bf16`` or ``amx_bf16`` (``/proc/cpuinfo``) and neither torch
    (``ATEN_CPU_CAPABILITY``) nor oneDNN (``ONEDNN_MAX_CPU_ISA``) is held below AVX-512. False
    where this cannot be read."""
    return not _no_native_bf16_reason()


def emulated_bf16_allowed(allow_emulated_bf16: bool = False) -> bool:
    """Whether the caller or the environment (:data:`ALLOW_EMULATED_BF16_ENV` = 1) asks for
    bf16 on a CPU without native bfloat16."""
    return allow_emulated_bf16 or os.environ.get(ALLOW_EMULATED_BF16_ENV, "") in ("1", "true")


def _device_type(device: Union[str, torch.device]) -> str:
    if str(device) == AUTO_DEVICE:
        device = resolve_device(AUTO_DEVICE)
    return torch.device(device).type


def check_precision(
    dtype: str, device: Union[str, torch.device], *, allow_emulated_bf16: bool = False
) -> str:
    """
    Validates a precision mode for a device.

    Args:
        dtype: one of :data:`PRECISIONS`.
        device: the model's device ("cpu", "cuda", "cuda:1", ..., or "auto").
        allow_emulated_bf16: run bf16 on a CPU without native bfloat16 (tens of times slower
            than fp32) instead of refusing it; also :data:`ALLOW_EMULATED_BF16_ENV` = 1.

    Returns:
        ``dtype``.

    Raises:
        ValueError: an unknown mode, fp16 on the CPU, bf16 on a CPU without native bfloat16
            (not allowed), or a mode on a device other than the CPU and CUDA.
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
        why = _no_native_bf16_reason() or "detection overridden"
        if not emulated_bf16_allowed(allow_emulated_bf16):
            raise ValueError(_EMULATED_BF16_MESSAGE.format(why=why))
        logger.warning(
            "dtype='bf16' on a CPU without native bfloat16 (%s), as asked: emulated, tens of "
            "times slower than fp32",
            why,
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
