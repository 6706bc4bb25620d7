"""
The device a model runs on: one rule for the predictors, the command lines and
``train_net.py``. A CUDA device without CUDA is an error, never a silent move to the CPU;
``"auto"`` is the way to ask for CUDA when it is available and the CPU otherwise.
"""

import logging
from typing import Optional

import torch
from omegaconf import OmegaConf

__all__ = ["AUTO_DEVICE", "resolve_device"]

logger = logging.getLogger(__name__)

AUTO_DEVICE = "auto"
"""The device value that picks CUDA when it is available, else the CPU."""


def resolve_device(device: Optional[str], cfg=None) -> str:
    """
    The device to run on: ``device``, else the config's ``train.device``, else the CPU.
    ``"auto"`` asks for CUDA when it is available and the CPU otherwise (the choice is logged).

    Raises:
        ValueError: a CUDA device is asked for but CUDA is not available; running on the CPU
            instead is a choice the caller makes (``device="auto"`` or ``"cpu"``), not a
            silent fallback.
    """
    source = "device"
    if not device and cfg is not None:
        device = OmegaConf.select(cfg, "train.device", default=None)
        source = "the config's train.device"
    device = str(device or "cpu")
    if device == AUTO_DEVICE:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("device auto: running on %s", device)
        return device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"{source} is {device!r} but CUDA is not available here; ask for the CPU "
            f"(device 'cpu', --device cpu, train.device=cpu) or for 'auto' (CUDA when "
            f"available, else the CPU)"
        )
    return device
