"""Key renaming from the official and the Hugging Face state dicts to this project's model.

:func:`convert_official_state_dict` and :func:`convert_hf_state_dict` return
``(state_dict, ignored)``: the renamed tensors, and the source keys dropped on purpose: copies
of a kept tensor (shared box heads) and BERT's unused pooler. Anything else that does not map
stays under its own name, so that loading reports it as unexpected. The input projections'
converters map the references' ``input_proj`` layout onto the neck's.

With ``per_layer_heads=True`` (MM-Grounding-DINO and LLMDet: transformers'
``MMGroundingDinoForObjectDetection``, mmdetection's unshared branches) box head ``i`` becomes
``decoder.bbox_embed.<i>`` and contrastive head ``i`` ``head.<i>`` instead of being a copy of
head 0; the encoder's contrastive head becomes ``query_selector.head``.
"""

import re
from typing import Callable, Dict, List, Tuple, Union

import torch

from .swin_sources import convert_hf_swin_state_dict, convert_official_swin_state_dict

__all__ = [
    "convert_official_state_dict",
    "convert_hf_state_dict",
    "convert_official_input_proj_state_dict",
    "convert_hf_input_proj_state_dict",
    "rename",
]

Rules = List[Tuple[str, Union[str, Callable]]]

# Official names -> ours (applied after the image body, ``backbone.0.*`` -> ``backbone.*``, and
# the input projections, ``input_proj.*`` -> ``neck.*``, are handled).
_OFFICIAL_RULES: Rules = [
    (r"^bert\.", "text_encoder.bert."),
    (r"^feat_map\.", "text_encoder.feat_map."),
    (r"^transformer\.level_embed$", "enhancer.level_embed"),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.", r"enhancer.layers.\1.fusion."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.", r"enhancer.layers.\1.text_layer."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"enhancer.layers.\1.image_layer."),
    (r"^transformer\.enc_output\.", "query_selector.enc_output."),
    (r"^transformer\.enc_output_norm\.", "query_selector.enc_output_norm."),
    (r"^transformer\.tgt_embed\.", "query_selector.tgt_embed."),
    (r"^transformer\.enc_out_bbox_embed\.", "query_selector.bbox_embed."),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"decoder.layers.\1."),
    (r"^transformer\.decoder\.norm\.", "decoder.norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "decoder.ref_point_head."),
    (r"^bbox_embed\.0\.", "decoder.bbox_embed."),
]
# Copies of the shared decoder box head, and BERT's pooler (unused by the model).
_OFFICIAL_DUPLICATES = [
    r"^bbox_embed\.[1-9]\d*\.",
    r"^transformer\.decoder\.bbox_embed\.",
    r"^bert\.pooler\.",
]

_HF_RULES: Rules = [
    (r"^model\.text_backbone\.", "text_encoder.bert."),
    (r"^model\.text_projection\.", "text_encoder.feat_map."),
    (r"^model\.level_embed$", "enhancer.level_embed"),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision\.",
        r"enhancer.layers.\1.fusion.layer_norm_v.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text\.",
        r"enhancer.layers.\1.fusion.layer_norm_l.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param$",
        r"enhancer.layers.\1.fusion.gamma_v",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param$",
        r"enhancer.layers.\1.fusion.gamma_l",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_)?vision_proj\.",
        r"enhancer.layers.\1.fusion.attn.\2v_proj.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_)?text_proj\.",
        r"enhancer.layers.\1.fusion.attn.\2l_proj.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.",
        r"enhancer.layers.\1.text_layer.self_attn.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc(\d)\.",
        r"enhancer.layers.\1.text_layer.linear\2.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before\.",
        r"enhancer.layers.\1.text_layer.norm1.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after\.",
        r"enhancer.layers.\1.text_layer.norm2.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn\.",
        r"enhancer.layers.\1.image_layer.self_attn.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm\.",
        r"enhancer.layers.\1.image_layer.norm1.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.fc(\d)\.",
        r"enhancer.layers.\1.image_layer.linear\2.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm\.",
        r"enhancer.layers.\1.image_layer.norm2.",
    ),
    (r"^model\.enc_output\.", "query_selector.enc_output."),
    (r"^model\.enc_output_norm\.", "query_selector.enc_output_norm."),
    (r"^model\.query_position_embeddings\.", "query_selector.tgt_embed."),
    (r"^model\.encoder_output_bbox_embed\.", "query_selector.bbox_embed."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_text\.", r"decoder.layers.\1.ca_text."),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm\.",
        r"decoder.layers.\1.catext_norm.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.fc(\d)\.", r"decoder.layers.\1.linear\2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layer_norm\.", "decoder.norm."),
    (r"^model\.decoder\.reference_points_head\.", "decoder.ref_point_head."),
    (r"^bbox_embed\.0\.", "decoder.bbox_embed."),
]
_HF_DUPLICATES = [r"^bbox_embed\.[1-9]\d*\.", r"^model\.decoder\.bbox_embed\."]
# One head per decoder layer (checked first), and the decoder's references to them.
_OFFICIAL_PER_LAYER_RULES: Rules = [(r"^bbox_embed\.(\d+)\.", r"decoder.bbox_embed.\1.")]
_OFFICIAL_PER_LAYER_DUPLICATES = [r"^transformer\.decoder\.bbox_embed\.", r"^bert\.pooler\."]
_HF_PER_LAYER_RULES: Rules = [
    (r"^bbox_embed\.(\d+)\.", r"decoder.bbox_embed.\1."),
    (r"^class_embed\.(\d+)\.", r"head.\1."),
    (r"^model\.encoder_output_class_embed\.", "query_selector.head."),
]
# transformers ties ``model.decoder.{bbox,class}_embed`` to the top-level heads; a saved file
# holds each tensor under either name (safetensors keeps one name per shared tensor).
_HF_DECODER_HEAD_ALIAS = re.compile(r"^model\.decoder\.((?:bbox|class)_embed\.\d+\..*)$")
# HF splits packed attention projections into query/key/value.
_HF_PACKED_ATTENTION = re.compile(
    r"^(enhancer\.layers\.\d+\.text_layer\.self_attn|decoder\.layers\.\d+\.(?:self_attn|ca_text))"
    r"\.(query|key|value)\.(weight|bias)$"
)


def rename(key: str, rules: Rules) -> str:
    """``key`` renamed by the first rule whose pattern matches (a replacement string or a
    function of the match, as ``re.sub``); unchanged when none does."""
    for pattern, replacement in rules:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key


def _split_off(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Removes and returns the entries under ``prefix``, with the prefix stripped."""
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    for key in list(state):
        if key.startswith(prefix):
            del state[key]
    return part


def _convert(
    state,
    rules,
    duplicates,
    backbone_prefix,
    backbone_converter: Callable,
    proj_prefix,
    proj_converter: Callable,
) -> Tuple[Dict, List[str]]:
    state = dict(state)
    converted: Dict[str, torch.Tensor] = {}
    for key, value in backbone_converter(_split_off(state, backbone_prefix)).items():
        converted[f"backbone.{key}"] = value
    for key, value in proj_converter(_split_off(state, proj_prefix)).items():
        converted[f"neck.{key}"] = value
    ignored = [k for k in state if any(re.match(p, k) for p in duplicates)]
    for key in ignored:
        del state[key]
    packed: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        new_key = rename(key, rules)
        match = _HF_PACKED_ATTENTION.match(new_key)
        if match:
            module, part, kind = match.groups()
            packed.setdefault(f"{module}.in_proj_{kind}", {})[part] = value
            continue
        converted[new_key] = value
    for key, parts in packed.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"Incomplete attention projections for {key}: {sorted(parts)}")
        converted[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return converted, ignored


def _rename_input_proj(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(\d+)\.([01])\.(weight|bias)$", key)
        if not m:
            raise KeyError(f"Unexpected input projection key {key!r} (expected '<l>.<0|1>.*')")
        level, part, name = m.groups()
        prefix = f"projections.{level}." + ("" if part == "0" else "norm.")
        out[prefix + name] = value
    return out


def convert_official_input_proj_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys after ``input_proj.`` (``<l>.0.*`` conv, ``<l>.1.*`` GroupNorm) ->
    :class:`InputProjectionNeck`'s (``projections.<l>.*``, ``projections.<l>.norm.*``)."""
    return _rename_input_proj(sd)


def convert_hf_input_proj_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' keys after ``model.input_proj_vision.`` (the official layout) ->
    :class:`InputProjectionNeck`'s."""
    return _rename_input_proj(sd)


def convert_official_state_dict(
    state: Dict[str, torch.Tensor], per_layer_heads: bool = False
) -> Tuple[Dict, List[str]]:
    """Official ``ckpt["model"]`` (optionally ``module.``-prefixed) -> this model's keys;
    ``per_layer_heads``: keep every ``bbox_embed.<i>`` (see the module docstring)."""
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    return _convert(
        state,
        (_OFFICIAL_PER_LAYER_RULES if per_layer_heads else []) + _OFFICIAL_RULES,
        _OFFICIAL_PER_LAYER_DUPLICATES if per_layer_heads else _OFFICIAL_DUPLICATES,
        "backbone.0.",
        convert_official_swin_state_dict,
        "input_proj.",
        convert_official_input_proj_state_dict,
    )


def convert_hf_state_dict(
    state: Dict[str, torch.Tensor], per_layer_heads: bool = False
) -> Tuple[Dict, List[str]]:
    """transformers' ``GroundingDinoForObjectDetection`` state dict -> this model's keys;
    with ``per_layer_heads``, ``MMGroundingDinoForObjectDetection``'s."""
    aliases: List[str] = []
    if per_layer_heads:
        state, aliases = _merge_decoder_head_aliases(state)
    converted, ignored = _convert(
        state,
        (_HF_PER_LAYER_RULES if per_layer_heads else []) + _HF_RULES,
        [] if per_layer_heads else _HF_DUPLICATES,
        "model.backbone.conv_encoder.model.",
        convert_hf_swin_state_dict,
        "model.input_proj_vision.",
        convert_hf_input_proj_state_dict,
    )
    return converted, aliases + ignored


def _merge_decoder_head_aliases(
    state: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``model.decoder.{bbox,class}_embed.<i>.*`` -> ``{bbox,class}_embed.<i>.*`` (the same
    tied tensors); returns the state and the alias keys dropped as copies. ValueError when a
    copy differs from the tensor it is tied to."""
    merged, aliases = {}, []
    for key, value in state.items():
        match = _HF_DECODER_HEAD_ALIAS.match(key)
        if match is None:
            merged.setdefault(key, value)
            continue
        target = match.group(1)
        aliases.append(key)
        if target in state and not torch.equal(state[target], value):
            raise ValueError(f"{key} differs from {target}, the per-layer head it is tied to")
        merged.setdefault(target, value)
    return merged, aliases
