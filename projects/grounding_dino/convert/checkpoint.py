"""Safe checkpoint reading: never unpickles code from a downloaded file.

Two readers:

- :func:`load_checkpoint_file` reads weights files (tensors in plain containers) with
  ``torch.load(weights_only=True)`` or safetensors. The predictor and the checkpointer use it.
- :func:`load_training_checkpoint` also reads the *training* checkpoints of the official DINO
  and Open-GroundingDino code (``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``, where
  ``args`` is an ``argparse.Namespace`` and the scheduler state may hold a
  ``collections.Counter``). It unpickles through an allow-list: torch's own weights-only globals
  (tensor rebuild functions, storages, dtypes, ``OrderedDict``) plus ``argparse.Namespace``,
  ``collections.Counter``, ``set`` and ``frozenset``. Anything else is refused *before* it is
  imported or called, with the offending type named. The converter reads its inputs with it.
"""

import _compat_pickle
import argparse
import collections
import os
import pickle
import types
import zipfile
from typing import Any, Dict

import torch

__all__ = ["load_checkpoint_file", "load_training_checkpoint", "TRAINING_CHECKPOINT_GLOBALS"]

# The globals a training checkpoint may name beyond torch's weights-only ones.
TRAINING_CHECKPOINT_GLOBALS: Dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "collections.Counter": collections.Counter,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
}


def _torch_weights_only_globals() -> Dict[str, Any]:
    """torch's allow-list of ``torch.load(weights_only=True)`` (tensor rebuild functions,
    storages, dtypes, ``torch.Size``), keyed ``"module.name"``."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a type outside the allow-list."""


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; refuses every other one by name, before importing
    its module (so nothing in the file is ever called but the allow-listed constructors)."""

    allowed: Dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch's default) use Python 2 names: "__builtin__.set".
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self.allowed:
            return self.allowed[qualified]
        raise _RefusedGlobal(
            f"refused to load {qualified!r}: only tensors, plain containers, numbers, strings, "
            f"argparse.Namespace and collections.Counter are read from checkpoints"
        )


def _allow_list_pickle_module() -> types.ModuleType:
    """A module usable as ``torch.load(pickle_module=...)``: ``Unpickler`` and ``load``."""
    allowed = {**_torch_weights_only_globals(), **TRAINING_CHECKPOINT_GLOBALS}
    unpickler = type("AllowListUnpickler", (_AllowListUnpickler,), {"allowed": allowed})
    module = types.ModuleType("grounding_dino_allow_list_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def _load_safetensors(path: str) -> Dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a valid safetensors checkpoint: {error}") from error


def load_checkpoint_file(path: str, map_file: bool = False) -> Dict:
    """
    Reads a ``.pth``/``.pt`` (with ``torch.load(weights_only=True)``) or ``.safetensors`` file.

    ``map_file``: the tensors of a ``.pth`` (torch's zip format) map the file instead of being
    read into memory (``torch.load(mmap=True)``): pages are read as they are used, and nothing
    stays behind in the process's heap once the tensors are dropped. Reading it whole leaves
    the freed copy in glibc's heap (about 0.3 GB after loading a Swin-T model, measured in
    docs/benchmarks.md). Only for a caller that copies the tensors out and drops them: the
    mapping must not outlive a rewrite of the file. Other files are read whole.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a checkpoint, or holds anything but tensors and plain
            containers (a pickle that would run code); the message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    mmap = map_file and zipfile.is_zipfile(path)  # torch's legacy format cannot be mapped
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def load_training_checkpoint(path: str) -> Dict:
    """
    Reads a weights file or a training checkpoint (official DINO / Open-GroundingDino:
    ``{"model", "optimizer", "lr_scheduler", "epoch", "args": argparse.Namespace}``) through
    the allow-list unpickler described in the module docstring.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a checkpoint dict, or names a type outside the allow-list
            (the message names the file and the type; nothing of the file has run).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        data = torch.load(
            path, map_location="cpu", pickle_module=_allow_list_pickle_module(), weights_only=False
        )
    except _RefusedGlobal as error:
        raise ValueError(f"{path}: {error}") from error
    except Exception as error:  # torch raises many types (IndexError, RuntimeError, ...)
        raise ValueError(f"{path} is not a PyTorch checkpoint: {error!r}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    return data
