"""Partial checkpoints (some parts of the model, e.g. an ImageNet Swin or a closed-set DINO's
transformer) for ``train.init_checkpoint``, and :func:`load_init_checkpoint`, which loads any
supported checkpoint into a built model.

A partial checkpoint is ``{"model": {key: tensor}, "partial_checkpoint": {"source", "covers",
"not_covered", "dropped", "notes"}}`` (plain containers: it loads with
``torch.load(weights_only=True)``). Its keys are all keys of the model it was checked against;
the model keys it lacks keep their initialisation.
"""

import logging
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

from ..io.atomic import atomic_output, refuse_existing
from ..packaged_configs import get_config_file
from .checkpoint import load_training_checkpoint
from .sources import convert_state_dict, detect_source, unwrap_state_dict

__all__ = [
    "PARTIAL_KEY",
    "convert_partial_checkpoint",
    "drop_unused_source_keys",
    "load_init_checkpoint",
    "model_parameter_shapes",
    "read_init_checkpoint",
    "summarize_keys",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

PARTIAL_KEY = "partial_checkpoint"
# Model parts not built for the check of a partial checkpoint (no partial source covers them;
# BERT would need its pretrained files).
_NOT_BUILT = ("text_encoder", "prompt_encoder", "criterion")
_NOT_BUILT_NOTE = "text_encoder (BERT and feat_map: pretrained BERT / initialisation)"


def summarize_keys(keys: Iterable[str], covered: Iterable[str] = ()) -> List[str]:
    """Parameter names grouped by module, layer indices starred (``enhancer.layers.*.fusion``,
    ``decoder.bbox_embed``); a top-level part none of whose keys is in ``covered`` is named
    whole (``decoder``)."""
    covered_parts = {k.split(".")[0] for k in covered}
    groups = set()
    for key in keys:
        parts = re.sub(r"\.\d+(?=\.|$)", ".*", key).split(".")
        if parts[0] not in covered_parts and covered:
            groups.add(parts[0])
            continue
        if "*" in parts:
            star = parts.index("*")
            cut = star + 2 if parts[star - 1] == "layers" else star
        else:
            cut = 2
        groups.add(".".join(parts[: min(cut, len(parts))]))
    return sorted(groups)


def model_parameter_shapes(model_cfg) -> Dict[str, torch.Size]:
    """Shapes of the state dict of a lazy ``model`` config, building every part but the text
    side (``text_encoder``, ``prompt_encoder``) and the criterion."""
    shapes: Dict[str, torch.Size] = {}
    for name in model_cfg:
        node = model_cfg[name]
        if name in _NOT_BUILT or not (isinstance(node, Mapping) and "_target_" in node):
            continue
        module = instantiate(node)
        if isinstance(module, nn.Module):
            shapes.update({f"{name}.{k}": v.shape for k, v in module.state_dict().items()})
    return shapes


def write_checkpoint(
    out_dir: str, state: Dict[str, torch.Tensor], partial: Optional[Dict], force: bool = False
) -> str:
    """Writes ``out_dir/model.pth`` (``{"model": state}``, plus ``partial_checkpoint``)
    atomically; an existing file is an error naming it unless ``force``. Returns the path."""
    path = os.path.abspath(os.path.join(out_dir, "model.pth"))
    refuse_existing([path], force=force)
    os.makedirs(out_dir, exist_ok=True)
    data = {"model": {k: v.contiguous() for k, v in state.items()}}
    if partial is not None:
        data[PARTIAL_KEY] = partial
    with atomic_output(path) as temporary:
        torch.save(data, temporary)
    return path


def _default_partial_config(source: str, converted: Mapping[str, torch.Tensor]) -> str:
    if source == "imagenet-swin":
        return get_config_file("pretrain_swin_t_o365_goldg.py")
    if any(k.startswith(("backbone.stem.", "backbone.res")) for k in converted):
        return get_config_file("grounding_dino_r50.py")
    return get_config_file("grounding_dino_swin_t_ogc.py")


def convert_partial_checkpoint(
    source: str,
    state: Mapping[str, torch.Tensor],
    out_dir: str,
    *,
    src: str,
    config: Optional[str] = None,
    skipped: Iterable[str] = (),
    force: bool = False,
) -> Dict:
    """
    Converts the weights ``state`` read from the file ``src`` (a partial source:
    ``imagenet-swin``, ``dino-official``, ``dino-detrex``),
    checks it against the model of ``config`` (default: the Swin-T pre-training config for
    Swin, the Swin-T or R-50 Grounding DINO for DINO) and writes ``out_dir/model.pth``.

    Returns:
        ``{"path", "source", "covers", "not_covered", "dropped", "unused", "notes",
        "skipped_entries"}``: covered / not covered model parts (grouped names), source keys
        dropped on purpose (with reasons) or unused (no counterpart in the model), notes.

    Raises:
        ValueError: a converted tensor's shape differs from the model's (names the key, the
            shapes and the config), or nothing of the model is covered.
    """
    converted, info = convert_state_dict(source, state)
    config = config or _default_partial_config(source, converted)
    shapes = model_parameter_shapes(LazyConfig.load(config).model)
    for key in sorted(set(converted) & set(shapes)):
        if converted[key].shape != shapes[key]:
            raise ValueError(
                f"{src}: {key} has shape {tuple(converted[key].shape)}, the model of {config} "
                f"expects {tuple(shapes[key])}; pass --config with a matching model"
            )
    kept = {k: v for k, v in converted.items() if k in shapes}
    if not kept:
        raise ValueError(f"{src}: no tensor maps onto the model of {config}")
    unused = sorted(set(converted) - set(shapes))
    report = {
        "source": source,
        "covers": summarize_keys(kept),
        "not_covered": summarize_keys(set(shapes) - set(kept), kept) + [_NOT_BUILT_NOTE],
        "dropped": {k: info["dropped"][k] for k in sorted(info["dropped"])},
        "unused": unused,
        "notes": list(info["notes"]),
        "skipped_entries": list(skipped),
        "config": config,
    }
    partial = {k: report[k] for k in ("source", "covers", "not_covered", "notes")}
    partial["dropped"] = sorted(report["dropped"]) + unused
    report["path"] = write_checkpoint(out_dir, kept, partial, force)
    return report


def read_init_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """
    Reads ``path`` (any supported checkpoint, converted or not; through the allow-list
    unpickler) and returns its weights in this model's keys, converting in memory when needed.

    Returns:
        (state, info): ``info = {"source", "partial" (the file covers only part of a model:
        a partial checkpoint, or an unconverted partial source), "dropped", "notes",
        "skipped_entries"}``.
    """
    data = dict(load_training_checkpoint(path))
    meta = data.pop(PARTIAL_KEY, None)
    state, skipped = unwrap_state_dict(data, path)
    if meta is not None:
        info = {"source": meta.get("source", "partial"), "partial": True, "dropped": {}}
        info["notes"] = list(meta.get("notes", []))
    else:
        state, info = convert_state_dict(detect_source(state), state)
        info.pop("official_layout", None)
    info["skipped_entries"] = skipped
    info["converted"] = meta is None and info["source"] != "grounding-dino"
    return state, info


def drop_unused_source_keys(
    state: Dict[str, torch.Tensor], info: Mapping, model_keys: Iterable[str]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """
    For an unconverted partial source (``info`` of :func:`read_init_checkpoint`), the keys
    with no counterpart in the model are skipped rather than unexpected (e.g. a DINO's extra
    norm). Anything else is returned unchanged.

    Returns:
        (state without the skipped keys, the skipped keys sorted).
    """
    if not (info["partial"] and info["converted"]):
        return state, []
    model_keys = set(model_keys)
    unused = sorted(set(state) - model_keys)
    return {k: v for k, v in state.items() if k in model_keys}, unused


def load_init_checkpoint(path: str, model: nn.Module) -> Dict:
    """
    Loads ``path`` into ``model`` for ``train.init_checkpoint``: a converted checkpoint (full
    or partial), or an unconverted one of any supported source (:func:`read_init_checkpoint`).

    A full checkpoint must match the model exactly; a partial one loads what it covers and
    leaves the rest of the model at its initialisation (listed in the report). Keys of an
    unconverted partial source with no counterpart in the model are skipped and listed.

    Returns:
        ``{"source", "partial", "loaded" (int), "missing" (keys left at initialisation),
        "not_covered" (the same, grouped), "unused", "dropped", "notes", "skipped_entries"}``.

    Raises:
        ValueError: unexpected keys or shape mismatches, missing keys of a full checkpoint, or a
            file that is not a supported checkpoint (names the file).
    """
    state, info = read_init_checkpoint(path)
    partial = info["partial"]
    expected = model.state_dict()
    state, unused = drop_unused_source_keys(state, info, expected)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{path}: {len(unexpected)} keys the model does not have: {unexpected[:10]}"
        )
    for key in sorted(state):
        if state[key].shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing and not partial:
        raise ValueError(f"{path}: {len(missing)} model keys missing, e.g. {missing[:10]}")
    model.load_state_dict(state, strict=False)
    report = {
        "source": info["source"],
        "partial": partial,
        "loaded": len(state),
        "missing": missing,
        "not_covered": summarize_keys(missing, state),
        "unused": unused,
        "dropped": info["dropped"],
        "notes": info["notes"],
        "skipped_entries": info["skipped_entries"],
    }
    logger.info(
        "Loaded %d tensors from %s (%s%s)%s",
        len(state),
        path,
        info["source"],
        ", partial" if partial else "",
        f"; left at initialisation: {', '.join(report['not_covered'])}" if missing else "",
    )
    for key in unused:
        logger.warning("%s: %s has no counterpart in the model; skipped", path, key)
    for note in info["notes"]:
        logger.warning("%s: %s", path, note)
    return report
