"""The checkpoint sources the converter reads: recognising a state dict's key layout and
renaming it to this model's keys.

Full sources (every part of the model): ``grounding-dino`` (this project's own keys),
``official`` (the official release and Open-GroundingDino training checkpoints), ``hf``
(transformers), ``mmdet`` (mmdetection 3.x). Partial sources (some parts; the rest keeps its
initialisation): ``imagenet-swin`` (official Swin release or timm), ``dino-official`` and
``dino-detrex`` (closed-set DINO).
"""

import re
from typing import Dict, List, Mapping, Tuple

import torch

from .dino import convert_dino_state_dict, dino_layout
from .keys import convert_hf_state_dict, convert_official_state_dict
from .mmdet import mmdet_per_layer_heads, mmdet_to_official_state_dict
from .swin_sources import convert_imagenet_swin_state_dict, imagenet_swin_layout

__all__ = [
    "FULL_SOURCES",
    "PARTIAL_SOURCES",
    "convert_state_dict",
    "detect_source",
    "unwrap_state_dict",
]

FULL_SOURCES = ("grounding-dino", "official", "hf", "mmdet")
PARTIAL_SOURCES = ("imagenet-swin", "dino-official", "dino-detrex")
_OURS = ("backbone.", "neck.", "text_encoder.", "enhancer.", "query_selector.", "decoder.", "head.")


def unwrap_state_dict(data: Mapping, path: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """
    The weights of a checkpoint dict: ``data["model"]`` (detectron2, official, DINO,
    Open-GroundingDino), ``data["state_dict"]`` (mmdet) or ``data`` itself, with ``module.``
    prefixes removed.

    Returns:
        (state, skipped): the state dict, and the other top-level entries, which are not
        converted (training state such as ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``,
        ``meta``, ``ema_model``).

    Raises:
        ValueError: a weight is not a tensor (the message names the file and the key).
    """
    for name in ("model", "state_dict"):
        if isinstance(data.get(name), Mapping):
            state, skipped = data[name], [k for k in data if k != name]
            break
    else:
        state, skipped = data, []
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out, sorted(skipped)


def detect_source(state: Mapping[str, torch.Tensor]) -> str:
    """The source whose key layout ``state`` has (see the module docstring); ValueError when
    none is recognised."""

    def has(*patterns: str) -> bool:
        return any(re.match(p, k) for p in patterns for k in state)

    if state and all(k.startswith(_OURS) for k in state):
        return "grounding-dino"
    if has(r"^model\.text_backbone\.", r"^model\.encoder\.layers\.\d+\.fusion_layer\."):
        return "hf"
    if has(r"^bbox_head\.", r"^language_model\.", r"^memory_trans_fc\."):
        return "mmdet"
    if has(r"^bert\.", r"^transformer\.encoder\.fusion_layers\.", r"^feat_map\."):
        return "official"
    if has(r"^transformer\.encoder\.layers\."):
        return dino_layout(state)
    if "patch_embed.proj.weight" in state:
        imagenet_swin_layout(state)  # raises when not a Swin
        return "imagenet-swin"
    raise ValueError(
        "unrecognised checkpoint layout (keys start with "
        f"{sorted({k.split('.')[0] for k in state})[:8]}); known: "
        f"{', '.join(FULL_SOURCES + PARTIAL_SOURCES)}"
    )


def convert_state_dict(
    source: str, state: Mapping[str, torch.Tensor], per_layer_heads: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """
    Renames ``state`` (in ``source``'s layout) to this model's keys.

    Args:
        per_layer_heads: ``hf`` only: a transformers ``mm-grounding-dino`` state dict (one
            head per decoder layer). mmdet state dicts say it themselves (their branches).

    Returns:
        (converted, info): the tensors, and ``{"source", "partial" (bool), "dropped": {source
        key: reason}, "notes": [str], "per_layer_heads" (bool)}``. Keys that no rule maps keep
        their names (they are reported as unexpected or unused later, never loaded silently).
    """
    if source == "mmdet":
        per_layer_heads = mmdet_per_layer_heads(state)
    info = {
        "source": source,
        "partial": source in PARTIAL_SOURCES,
        "dropped": {},
        "notes": [],
        "per_layer_heads": per_layer_heads,
    }
    if source == "grounding-dino":
        return dict(state), info
    if source in ("official", "hf"):
        convert = convert_official_state_dict if source == "official" else convert_hf_state_dict
        converted, ignored = convert(state, per_layer_heads=per_layer_heads)
        info["dropped"] = {k: "copy of a shared tensor, or BERT's unused pooler" for k in ignored}
        return converted, info
    if source == "mmdet":
        official, head, dropped, notes = mmdet_to_official_state_dict(state, per_layer_heads)
        converted, ignored = convert_official_state_dict(official, per_layer_heads)
        converted.update(head)
        info["dropped"] = {**dropped, **{k: "copy of a shared tensor" for k in ignored}}
        info["notes"] = notes
        info["official_layout"] = official
        return converted, info
    if source == "imagenet-swin":
        body, dropped = convert_imagenet_swin_state_dict(state)
        info["dropped"] = dropped
        return {f"backbone.{k}": v for k, v in body.items()}, info
    if source in ("dino-official", "dino-detrex"):
        converted, dropped, notes = convert_dino_state_dict(state, source)
        info["dropped"], info["notes"] = dropped, notes
        return converted, info
    raise ValueError(
        f"Unknown source {source!r}; known: {', '.join(FULL_SOURCES + PARTIAL_SOURCES)}"
    )
