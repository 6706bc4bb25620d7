"""
A detectron2 checkpointer that never unpickles code from checkpoint files and refuses weights
that do not fit the model.

detectron2 / fvcore load checkpoints leniently: missing and unexpected keys are logged, and a
weight whose shape differs from the model's is skipped, so the layer silently keeps its random
initialisation. Here a checkpoint must match the model exactly (same keys, same shapes), or
the load fails with an error naming the keys. Starting training from part of a checkpoint (an
ImageNet backbone, a different query count...) is allowed only when asked for with
``partial`` (``train.init_partial`` in ``train_net.py``), and then reported.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple, Union

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys, _strip_prefix_if_present
from torch import nn

from .convert.checkpoint import load_checkpoint_file
from .convert.partial import drop_unused_source_keys, read_init_checkpoint

__all__ = [
    "CheckpointMismatch",
    "CheckpointMismatchError",
    "GroundingDINOCheckpointer",
    "check_partial",
    "compare_state_dict",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

Partial = Union[bool, Tuple[str, ...]]

_SHOWN = 5  # keys named per kind in an error message


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model (the message names them)."""


@dataclass
class CheckpointMismatch:
    """
    How a checkpoint's model state fits a model.

    Attributes:
        missing: model keys absent from the checkpoint (aliases of shared tensors that the
            checkpoint holds under another name do not count).
        unexpected: checkpoint keys the model does not have.
        wrong_shape: ``(key, shape in the checkpoint, shape in the model)``.
        computed: checkpoint keys that are non-persistent buffers of the model (the model
            computes them itself; they are ignored, never loaded).
        loaded: model keys the checkpoint fills (present with the right shape).
        model_keys: all keys of the model's state dict.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    computed: List[str] = field(default_factory=list)
    loaded: List[str] = field(default_factory=list)
    model_keys: List[str] = field(default_factory=list)

    def refused(self, partial: Partial) -> "CheckpointMismatch":
        """
        The mismatches that ``partial`` does not allow (see :func:`check_partial`): all of
        them for False, none for True; for prefixes, the missing and wrong-shape keys outside
        them, and every unexpected key.
        """
        if partial is True:
            return CheckpointMismatch()
        if partial is False:
            return CheckpointMismatch(
                missing=list(self.missing),
                unexpected=list(self.unexpected),
                wrong_shape=list(self.wrong_shape),
            )
        return CheckpointMismatch(
            missing=[k for k in self.missing if not k.startswith(partial)],
            unexpected=list(self.unexpected),
            wrong_shape=[s for s in self.wrong_shape if not s[0].startswith(partial)],
        )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        """The mismatches, the first few keys of each kind with their counts."""
        parts = []
        if self.missing:
            parts.append(
                f"{len(self.missing)} missing key(s) (in the model, not in the checkpoint): "
                + _first(self.missing)
            )
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} unexpected key(s) (in the checkpoint, not in the "
                "model): " + _first(self.unexpected)
            )
        if self.wrong_shape:
            shapes = [
                f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in self.wrong_shape
            ]
            parts.append(f"{len(self.wrong_shape)} weight(s) of the wrong shape: " + _first(shapes))
        return "; ".join(parts)

    def loaded_by_module(self) -> Dict[str, Tuple[int, int]]:
        """{top-level module: (tensors loaded, tensors in the model)}."""
        loaded = set(self.loaded)
        counts: Dict[str, List[int]] = OrderedDict()
        for key in self.model_keys:
            count = counts.setdefault(key.split(".", 1)[0], [0, 0])
            count[0] += key in loaded
            count[1] += 1
        return {name: (a, b) for name, (a, b) in counts.items()}


def _first(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def compare_state_dict(model: nn.Module, state_dict: Mapping) -> CheckpointMismatch:
    """
    Compares a checkpoint's model state with ``model`` (nothing is loaded).

    Args:
        model: the model (unwrapped).
        state_dict: {key: tensor} of the checkpoint; a ``module.`` prefix (a checkpoint saved
            from a DistributedDataParallel model) is ignored.

    Returns:
        a :class:`CheckpointMismatch`.
    """
    state = OrderedDict(state_dict)
    _strip_prefix_if_present(state, "module.")
    model_state = model.state_dict()
    persistent = set(model_state)
    non_persistent = {name for name, _ in model.named_buffers()} - persistent
    result = CheckpointMismatch(model_keys=list(model_state))
    for key, value in state.items():
        if key in model_state:
            shape_model = tuple(model_state[key].shape)
            shape_checkpoint = tuple(getattr(value, "shape", ()))
            if shape_model != shape_checkpoint:
                result.wrong_shape.append((key, shape_checkpoint, shape_model))
            else:
                result.loaded.append(key)
        elif key in non_persistent:
            result.computed.append(key)
        else:
            result.unexpected.append(key)
    missing = [k for k in model_state if k not in state]
    if missing:
        kept = set(_filter_reused_missing_keys(model, missing))
        result.missing = [k for k in missing if k in kept]
    return result


def check_partial(partial, name: str = "train.init_partial") -> Partial:
    """
    Validates a partial-loading policy.

    Args:
        partial: False (the checkpoint must match the model exactly), True (load whatever
            matches; the rest keeps the model's initialisation) or a list of key prefixes
            (e.g. ``["neck.", "decoder."]``) whose keys may be missing from the checkpoint or
            have another shape there; unexpected keys stay errors.
        name: the setting's name, for error messages.

    Returns:
        False, True or a tuple of prefixes.
    """
    if isinstance(partial, bool):
        return partial
    if isinstance(partial, str) or not isinstance(partial, Sequence):
        raise ValueError(f"{name} must be False, True or a list of key prefixes, got {partial!r}")
    prefixes = tuple(partial)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {partial!r}")
    return prefixes


def _model_state_of(data: Mapping) -> Mapping:
    return data["model"] if "model" in data else data


def _refuse_adapter(path: str, data: Mapping, model: nn.Module) -> None:
    """An adapter-only checkpoint of a LoRA run (``"lora"`` record) fits only the adapter
    weights (``grounding_dino.finetune.lora.AdapterWeights``), never a plain model."""
    if "lora" in data and not getattr(model, "holds_adapter_only", False):
        base = data["lora"].get("base_checkpoint", "?")
        raise CheckpointMismatchError(
            f"{path} holds only a LoRA adapter (trained on {base}); merge it into plain weights "
            f"first: python -m grounding_dino.finetune merge-lora CONFIG {path} OUT.pth"
        )


def verify_checkpoint(model: nn.Module, path: str) -> None:
    """
    Reads ``path`` safely (:func:`~grounding_dino.convert.checkpoint.load_checkpoint_file`)
    and checks that its model state matches ``model`` exactly, without loading it.

    Raises:
        CheckpointMismatchError: missing, unexpected or wrong-shape keys (named).
    """
    data = load_checkpoint_file(path)
    _refuse_adapter(path, data, model)
    mismatch = compare_state_dict(model, _model_state_of(data))
    if mismatch:
        raise CheckpointMismatchError(_mismatch_message(path, mismatch, False))


def _mismatch_message(path: str, refused: CheckpointMismatch, partial: Partial) -> str:
    if partial is False:
        allowed = (
            "Inference needs an exact match; training (train_net.py) may start from part of a "
            "checkpoint with train.init_partial=True or a list of key prefixes that may stay "
            "at the model's initialisation."
        )
    else:
        allowed = f"Not covered by train.init_partial={list(partial)}."
    return (
        f"The checkpoint {path} does not match the model: {refused.describe()}. Check that the "
        "config builds the model the checkpoint was saved from (overrides such as "
        f"model.query_selector.num_queries change shapes). {allowed}"
    )


class GroundingDINOCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with two differences:

    * files are read with ``torch.load(weights_only=True)`` (or safetensors): detectron2's own
      loader unpickles with ``weights_only=False`` on torch 2.3, so a malicious ``.pth`` would
      run code on load; here it is refused with an error naming the file. Optimizer/scheduler
      state saved by this project's own training holds only tensors and plain containers, so
      ``--resume`` reads it safely too;
    * the model state must match the model: a missing, unexpected or wrong-shape key raises
      :class:`CheckpointMismatchError` naming the keys (the first few and the count), before
      anything is loaded. Non-persistent buffers (computed by the model) never count as
      missing; a checkpoint holding them has them ignored. ``load(path, partial=...)``
      allows a partial load (see :func:`check_partial`) and logs what was loaded per module
      and what was not.
    """

    _partial: Partial = False
    _path: str = ""
    _convert_sources: bool = False
    _map_file: bool = False

    def load(self, path: str, *args, partial: Partial = False, map_file: bool = False, **kwargs):
        """
        :meth:`DetectionCheckpointer.load` (``path``, ``checkpointables``) with the model
        check above. ``partial``: False, True or a tuple of key prefixes (:func:`check_partial`).
        ``map_file``: map the file rather than read it whole (see
        :func:`~grounding_dino.convert.checkpoint.load_checkpoint_file`); only where nothing
        of the returned checkpoint is kept (loading weights for a model, no checkpointables).
        """
        self._partial = check_partial(partial, "partial")
        self._path = path
        self._map_file = map_file
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._partial, self._path, self._map_file = False, "", False

    def resume_or_load(
        self,
        path: str,
        *,
        resume: bool = True,
        partial: Partial = False,
        convert_sources: bool = False,
    ):
        """
        With ``resume`` and a checkpoint in ``save_dir``: loads the run's own last checkpoint
        (model, optimizer, scheduler, iteration), which must match the model exactly; else
        loads ``path`` with ``partial``.

        ``convert_sources`` (training initialisation only): ``path`` may also be an unconverted
        checkpoint of another code base (official, Open-GroundingDino, mmdet, a closed-set DINO,
        an ImageNet Swin), read through the converter's allow-list unpickler and converted in
        memory (:func:`grounding_dino.convert.read_init_checkpoint`). A partial source needs
        ``partial`` (``train.init_partial``).
        """
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file())
        self._convert_sources = convert_sources
        try:
            return self.load(path, partial=partial)
        finally:
            self._convert_sources = False

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            raise ValueError(f"{filename}: pickled detectron2 model-zoo files are not supported")
        if self._convert_sources:
            return self._load_init_source(filename)
        data = load_checkpoint_file(filename, map_file=self._map_file)
        if "model" not in data:
            data = {"model": data}
        data.setdefault("matching_heuristics", False)
        return data

    def _load_init_source(self, filename: str) -> Dict:
        """Reads a training initialisation of any supported source, converted to our keys."""
        state, info = read_init_checkpoint(filename)
        if info["partial"] and self._partial is False:
            raise CheckpointMismatchError(
                f"{filename} is a partial checkpoint ({info['source']}): it covers only part of "
                "the model. Set train.init_partial=True (or the key prefixes it leaves out) to "
                "start training from it."
            )
        if info["converted"]:
            logger.info(f"{filename}: converted from the {info['source']} layout in memory")
        state, unused = drop_unused_source_keys(state, info, self.model.state_dict())
        for key in unused:
            logger.warning(f"{filename}: {key} has no counterpart in the model; skipped")
        for note in info.get("notes", []):
            logger.warning(f"{filename}: {note}")
        for entry in info.get("skipped_entries", []):
            logger.info(f"{filename}: entry {entry!r} is not model weights; not loaded")
        return {"model": state, "matching_heuristics": False}

    def _load_model(self, checkpoint):
        path = self._path or "the checkpoint"
        _refuse_adapter(path, checkpoint, self.model)
        state = checkpoint["model"]
        _strip_prefix_if_present(state, "module.")
        mismatch = compare_state_dict(self.model, state)
        if isinstance(self._partial, tuple):
            unknown = [
                p for p in self._partial if not any(k.startswith(p) for k in mismatch.model_keys)
            ]
            if unknown:
                raise ValueError(
                    f"train.init_partial: no model key starts with {unknown} (top-level "
                    f"modules: {list(mismatch.loaded_by_module())})"
                )
        refused = mismatch.refused(self._partial)
        if refused:
            raise CheckpointMismatchError(_mismatch_message(path, refused, self._partial))
        for key in mismatch.computed:
            del state[key]
        if mismatch.computed:
            logger.info(
                f"{path}: ignored {len(mismatch.computed)} key(s) the model computes itself "
                f"(non-persistent buffers): {_first(mismatch.computed)}"
            )
        incompatible = super()._load_model(checkpoint)
        if self._partial is not False:
            modules = ", ".join(
                f"{name} {a}/{b}" for name, (a, b) in mismatch.loaded_by_module().items()
            )
            skipped = mismatch.describe() or "nothing"
            logger.warning(
                f"Partial load of {path} (allowed: {self._partial}): loaded "
                f"{len(mismatch.loaded)} of {len(mismatch.model_keys)} model tensors (per "
                f"module, loaded/total: {modules}). Not loaded, kept at the model's "
                f"initialisation or unused: {skipped}."
            )
        return incompatible
