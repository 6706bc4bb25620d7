"""Safe checkpoint reading: never unpickles code from a downloaded file."""

import os
import pickle
from typing import Dict

import torch

__all__ = ["load_checkpoint_file"]


def load_checkpoint_file(path: str) -> Dict:
    """
    Reads a ``.pth``/``.pt`` (with ``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a checkpoint, or holds anything but tensors and plain
            containers (a pickle that would run code); the message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a valid safetensors checkpoint: {error}") from error
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a plain weights checkpoint (refused by torch.load(weights_only=True)"
            f": {error}). Only tensors and plain containers are loaded."
        ) from error
    except Exception as error:  # torch raises many types (IndexError, RuntimeError, ...)
        raise ValueError(f"{path} is not a PyTorch checkpoint: {error!r}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    return data
