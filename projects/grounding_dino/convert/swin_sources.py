"""Swin weights from other code bases -> :class:`SwinBackbone`'s keys (the official Swin layout).

- The official Grounding DINO's body (``backbone.0.*``): the same names.
- transformers' ``SwinBackbone`` (inside ``GroundingDinoForObjectDetection``): its own names,
  query/key/value as separate projections, the stage norms as ``hidden_states_norms.stage<k>``.
- ImageNet classification releases of the official Swin repository
  (``swin_tiny_patch4_window7_224.pth``: ``{"model": {patch_embed.*, layers.<i>.blocks.<j>.*,
  layers.<i>.downsample.* (end of stages 0..n-2), norm.*, head.*}}``): the same names as ours.
- timm's ``swin_*`` models (timm >= 0.9): ``layers.<i>`` (``layers_<i>`` in ``features_only``
  models), the patch merging at the *start* of stages 1..n-1, ``head.fc.*``. timm's patch
  merging concatenates the 2x2 neighbours in the official order, so its weights need no
  permutation, only the stage shift.
- mmdetection's Swin (inside mmdet checkpoints): ``stages.<i>``, ``attn.w_msa.*``,
  ``ffn.layers.0.0`` / ``ffn.layers.1``, ``patch_embed.projection``, and a patch merging through
  ``nn.Unfold`` whose input channels are ordered differently (mmdet's
  ``correct_unfold_reduction_order``, undone here).

Rebuilt buffers (``relative_position_index``, ``attn_mask``) are dropped everywhere.
"""

import re
from typing import Dict, Mapping, Tuple, Union

import torch

from ..modeling.backbone import SWIN_VARIANTS

__all__ = [
    "convert_official_swin_state_dict",
    "convert_hf_swin_state_dict",
    "convert_imagenet_swin_state_dict",
    "convert_mmdet_swin_state_dict",
    "imagenet_swin_layout",
    "swin_variant_of_state_dict",
]

_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")


def convert_official_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Grounding DINO Swin keys (after ``backbone.0.``) -> :class:`SwinBackbone`'s:
    the same names, without the ``relative_position_index`` buffers (rebuilt)."""
    return {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}


_HF_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.blocks\.(\d+)\.output\.dense\.", r".blocks.\1.mlp.fc2."),
]


def convert_hf_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' ``SwinBackbone`` keys (after ``model.backbone.conv_encoder.model.``) ->
    :class:`SwinBackbone`'s.

    Renames as ``_HF_RENAMES``, concatenates query/key/value into ``attn.qkv``, and maps
    ``hidden_states_norms.stage<k>`` to ``norm<k-1>`` (transformers counts the stem as stage
    0); ``relative_position_index`` buffers are dropped.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue
        m = re.match(r"^hidden_states_norms\.stage(\d+)\.(.*)$", key)
        if m:
            out[f"norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
            continue
        new = key
        for pattern, replacement in _HF_RENAMES:
            new = re.sub(pattern, replacement, new)
        m = re.match(
            r"^(layers\.\d+\.blocks\.\d+\.)attention\.self\.(query|key|value)\.(\w+)$", new
        )
        if m:
            qkv.setdefault(f"{m.group(1)}attn.qkv.{m.group(3)}", {})[m.group(2)] = value
            continue
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise KeyError(f"HF Swin state dict lacks {missing} for {key}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def imagenet_swin_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"official"`` (patch merging at the end of stage 0) or ``"timm"`` (at the start of
    stage 1); ValueError when ``state`` is not a Swin classification state dict."""
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            "not a Swin state dict: no 'patch_embed.proj.weight' (keys start with "
            f"{sorted(state)[:3]})"
        )
    if any(k.startswith("layers.0.downsample.") for k in state):
        return "official"
    if any(re.match(r"^layers[._][1-9]\d*\.downsample\.", k) for k in state):
        return "timm"
    raise ValueError("Swin state dict without patch merging layers; cannot tell its layout")


def convert_imagenet_swin_state_dict(
    state: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """
    An ImageNet Swin (official release or timm; ``module.`` prefixes allowed) -> the keys of
    :class:`SwinBackbone` (without the ``backbone.`` prefix).

    Returns:
        (converted, dropped): the renamed tensors, and ``{source key: reason}`` for what has no
        place in the detector: the classification head, the final norm (the detector normalises
        each returned stage with its own ``norm<i>``, which stay at their initialisation) and
        the rebuilt buffers.
    """
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    layout = imagenet_swin_layout(state)
    converted: Dict[str, torch.Tensor] = {}
    dropped: Dict[str, str] = {}
    for key, value in state.items():
        if _BUFFERS.search(key):
            dropped[key] = "buffer rebuilt from the window size"
            continue
        if key.startswith("head."):
            dropped[key] = "ImageNet classification head"
            continue
        if key.startswith("norm."):
            dropped[key] = "final norm of the classifier; the detector has one norm<i> per stage"
            continue
        if layout == "timm":
            key = re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.",
                lambda m: f"layers.{int(m.group(1)) - 1}.downsample.",
                key,
            )
        converted[key] = value
    return converted, dropped


def _unfold_to_concat_order(weight: torch.Tensor) -> torch.Tensor:
    """mmdet's ``nn.Unfold`` channel order of a patch-merging weight ([out, 4C] or [4C]) ->
    the official concatenation order (the inverse of mmdet's ``correct_unfold_*_order``)."""
    if weight.dim() == 2:
        out_channels, in_channels = weight.shape
        grouped = weight.reshape(out_channels, in_channels // 4, 4)[:, :, [0, 2, 1, 3]]
        return grouped.transpose(1, 2).reshape(out_channels, in_channels)
    grouped = weight.reshape(weight.shape[0] // 4, 4)[:, [0, 2, 1, 3]]
    return grouped.transpose(0, 1).reshape(weight.shape[0])


_MMDET_RENAMES = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^stages\.(\d+)\.", r"layers.\1."),
    (r"\.attn\.w_msa\.", ".attn."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
]


def convert_mmdet_swin_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdetection's Swin keys (after ``backbone.``) -> :class:`SwinBackbone`'s."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _BUFFERS.search(key):
            continue
        for pattern, replacement in _MMDET_RENAMES:
            key = re.sub(pattern, replacement, key)
        if re.search(r"\.downsample\.(reduction|norm)\.", key):
            value = _unfold_to_concat_order(value)
        out[key] = value
    return out


def swin_variant_of_state_dict(state: Mapping[str, torch.Tensor]) -> Union[str, Dict]:
    """The :class:`SwinBackbone` variant of SwinBackbone-layout weights: a ``SWIN_VARIANTS``
    name when one has these sizes, else the sizes mapping."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))})
    depths, heads = [], []
    for i in stages:
        blocks = {
            int(m.group(1)) for k in state if (m := re.match(rf"^layers\.{i}\.blocks\.(\d+)\.", k))
        }
        depths.append(len(blocks))
        heads.append(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
    rows = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    sizes = {
        "embed_dim": int(state["patch_embed.proj.weight"].shape[0]),
        "depths": depths,
        "num_heads": heads,
        "window_size": (round(rows**0.5) + 1) // 2,
    }
    for name, (dim, variant_depths, variant_heads, window) in SWIN_VARIANTS.items():
        if (dim, list(variant_depths), list(variant_heads), window) == tuple(sizes.values()):
            return name
    return sizes
