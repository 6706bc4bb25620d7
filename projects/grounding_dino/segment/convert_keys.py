"""Key names of the original SAM and SAM 2 checkpoints -> transformers' ``SamModel`` /
``Sam2Model``.

Original layouts (``segment_anything`` ``sam_vit_h_4b8939.pth``: a plain state dict;
``sam2`` ``sam2.1_hiera_*.pt``: ``{"model": state_dict}``)::

    image_encoder.blocks.0.attn.qkv.weight           vision_encoder.layers.0.attn.qkv.weight
    image_encoder.blocks.0.norm1.weight              vision_encoder.layers.0.layer_norm1.weight
    image_encoder.neck.0.weight                      vision_encoder.neck.conv1.weight
    prompt_encoder.point_embeddings.0.weight         prompt_encoder.point_embed.0.weight
    prompt_encoder.mask_downscaling.0.weight         prompt_encoder.mask_embed.conv1.weight
    prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
                                                     shared_image_embedding.positional_embedding
    mask_decoder.transformer.layers.0.norm1.weight   (same).layer_norm1.weight
    mask_decoder.output_upscaling.0.weight           mask_decoder.upscale_conv1.weight
    mask_decoder.iou_prediction_head.layers.0.weight mask_decoder.iou_prediction_head.proj_in.weight

SAM 2 names its image encoder ``image_encoder.trunk`` / ``image_encoder.neck`` (Hiera + FPN),
its prompt encoder and decoder ``sam_prompt_encoder`` / ``sam_mask_decoder``, and adds the
video modules (memory attention and encoder, object pointers), which the image segmenter does
not have: they are dropped and counted (:data:`SAM2_VIDEO_PREFIXES`).

Every function returns the transformers name or None for a key it does not know; the caller
refuses the file naming those keys.

Checked, name by name, against transformers' own conversion scripts (``convert_sam_to_hf.py``
and ``convert_sam2_to_hf.py``, whose patterns are the original names) and the original module
definitions (``segment_anything/modeling``, ``sam2/modeling``): the same transformers name for
every key of the released SAM ViT-B/L/H and SAM 2 / 2.1 Hiera-T/S/B+/L files, the same value
transforms (none but SAM 2's four point embeddings stacked into one (4, C) table; no qkv split,
transpose or positional-embedding reshape; ``no_mem_embed`` (1, 1, C) is copied as is), and the
same video keys left out (the ones ``Sam2Model`` ignores on load). transformers also drops
segment_anything's ``pixel_mean`` / ``pixel_std`` (:data:`SAM_NORMALIZATION_KEYS`).
"""

import re
from typing import Dict, List, Optional, Tuple

__all__ = [
    "SAM_NORMALIZATION_KEYS",
    "sam_key",
    "sam2_key",
    "SAM2_VIDEO_PREFIXES",
    "stack_sam2_point_embeddings",
    "rename_state_dict",
]

# The MLPs of the original code are ``layers.0 .. layers.{L-1}``; transformers' are
# ``proj_in``, ``layers.0 .. layers.{L-3}``, ``proj_out``.
_MLP_HEADS = ("output_hypernetworks_mlps.\\d+", "iou_prediction_head", "pred_obj_score_head")

_SAM_VISION = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.blocks\.(\d+)\.", r".layers.\1."),
    (r"\.norm([12])\.", r".layer_norm\1."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
]

_PROMPT = [
    (r"\.point_embeddings\.(\d+)\.", r".point_embed.\1."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
]

_DECODER = [
    (r"\.transformer\.layers\.(\d+)\.norm([1234])\.", r".transformer.layers.\1.layer_norm\2."),
    (r"\.transformer\.norm_final_attn\.", ".transformer.layer_norm_final_attn."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
]

_POSITIONAL = "pe_layer.positional_encoding_gaussian_matrix"
_HF_POSITIONAL = "shared_image_embedding.positional_embedding"


def _apply(rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _mlp_layer(key: str, depths: Dict[str, int]) -> str:
    """``<head>.layers.i.`` -> ``proj_in`` / ``layers.{i-1}`` / ``proj_out`` given the head's
    depth (the number of its layers in the checkpoint, :func:`mlp_depths`)."""
    for head in _MLP_HEADS:
        match = re.search(f"(^|\\.)({head})\\.layers\\.(\\d+)\\.", key)
        if match:
            name, index = match.group(2), int(match.group(3))
            depth = depths[name]
            new = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else None
            new = new or f"layers.{index - 1}"
            return key[: match.start(2)] + f"{name}.{new}." + key[match.end() :]
    return key


def mlp_depths(keys) -> Dict[str, int]:
    """``{"iou_prediction_head": 3, "output_hypernetworks_mlps.0": 3, ...}``: the layers of
    each MLP head of the mask decoder (the names are unique in a checkpoint)."""
    depths: Dict[str, int] = {}
    for key in keys:
        for head in _MLP_HEADS:
            match = re.search(f"(^|\\.)({head})\\.layers\\.(\\d+)\\.", key)
            if match:
                name = match.group(2)
                depths[name] = max(depths.get(name, 0), int(match.group(3)) + 1)
    return depths


SAM_NORMALIZATION_KEYS = ("pixel_mean", "pixel_std")
"""segment_anything's input normalization ((3, 1, 1) each, for 0..255 pixels): buffers, not
weights (the released files lack them: they are not persistent), which transformers keeps in
the processor (``image_mean`` / ``image_std`` for 0..1 pixels)."""


def sam_key(key: str, depths: Dict[str, int]) -> Optional[str]:
    """An original SAM key -> transformers' ``SamModel`` key (None: not a SAM key)."""
    if key == f"prompt_encoder.{_POSITIONAL}":
        return _HF_POSITIONAL
    if key.startswith("image_encoder."):
        return _apply(_SAM_VISION, key)
    if key.startswith("prompt_encoder."):
        return _apply(_PROMPT, key)
    if key.startswith("mask_decoder."):
        return _mlp_layer(_apply(_DECODER, key), depths)
    return None


SAM2_VIDEO_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)
"""Original SAM 2 keys of the video modules, which transformers' image ``Sam2Model`` lacks: under
their transformers names (``memory_*``, ``mask_downsample``, ``object_pointer_proj``,
``temporal_positional_encoding_projection_layer``, ``no_memory_positional_encoding``,
``no_object_pointer``, ``occlusion_spatial_embedding_parameter``) they are the keys
``Sam2Model._keys_to_ignore_on_load_unexpected`` ignores."""

_SAM2_VISION = [
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.blocks\.(\d+)\.norm([12])\.", r".blocks.\1.layer_norm\2."),
    (r"\.blocks\.(\d+)\.mlp\.layers\.0\.", r".blocks.\1.mlp.proj_in."),
    (r"\.blocks\.(\d+)\.mlp\.layers\.1\.", r".blocks.\1.mlp.proj_out."),
]


# SAM 2's two-way transformer names its attention output ``out_proj`` and its MLP an ``MLP``
# (``layers.0/1``) where transformers has ``o_proj`` and ``proj_in/proj_out``.
_SAM2_DECODER = [
    (r"\.out_proj\.", ".o_proj."),
    (r"\.transformer\.layers\.(\d+)\.mlp\.layers\.0\.", r".transformer.layers.\1.mlp.proj_in."),
    (r"\.transformer\.layers\.(\d+)\.mlp\.layers\.1\.", r".transformer.layers.\1.mlp.proj_out."),
]

SAM2_POINT_EMBEDDINGS = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
"""SAM 2's four (1, C) point embeddings, one (4, C) ``prompt_encoder.point_embed`` in
transformers (:func:`stack_sam2_point_embeddings`)."""


def stack_sam2_point_embeddings(state_dict: Dict) -> Dict:
    """Replaces ``sam_prompt_encoder.point_embeddings.{i}.weight`` ((1, C) each) by one
    ``sam_prompt_encoder.point_embed.weight`` ((n, C), in index order)."""
    found = {}
    for key in state_dict:
        match = SAM2_POINT_EMBEDDINGS.match(key)
        if match:
            found[int(match.group(1))] = key
    if not found:
        return dict(state_dict)
    import torch

    out = {k: v for k, v in state_dict.items() if k not in found.values()}
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ValueError(f"SAM 2 point embeddings {missing} are missing (found {sorted(found)})")
    out["sam_prompt_encoder.point_embed.weight"] = torch.cat(
        [state_dict[found[index]] for index in range(len(found))]
    )
    return out


def sam2_key(key: str, depths: Dict[str, int]) -> Optional[str]:
    """An original SAM 2 key -> transformers' ``Sam2Model`` key (None: not an image-model
    key; the video keys are :data:`SAM2_VIDEO_PREFIXES`)."""
    if key == f"sam_prompt_encoder.{_POSITIONAL}":
        return _HF_POSITIONAL
    if key == "no_mem_embed":
        return "no_memory_embedding"
    if key.startswith("image_encoder."):
        renamed = _apply(_SAM2_VISION, key)
        return renamed if renamed.startswith("vision_encoder.") else None
    if key.startswith("sam_prompt_encoder."):
        return _apply(_PROMPT, "prompt_encoder." + key[len("sam_prompt_encoder.") :])
    if key.startswith("sam_mask_decoder."):
        key = "mask_decoder." + key[len("sam_mask_decoder.") :]
        return _mlp_layer(_apply(_DECODER + _SAM2_DECODER, key), depths)
    return None


def rename_state_dict(
    state_dict: Dict, rename, dropped_prefixes=()
) -> Tuple[Dict, List, List, Dict]:
    """
    Renames a state dict with ``rename(key, depths)``.

    Returns:
        ``(renamed, unknown keys, dropped keys, {new key: original key})``: keys under
        ``dropped_prefixes`` are dropped (and listed); keys ``rename`` does not know are listed
        as unknown.
    """
    depths = mlp_depths([key for key in state_dict if not key.startswith(tuple(dropped_prefixes))])
    renamed, unknown, dropped, origins = {}, [], [], {}
    for key, value in state_dict.items():
        if key.startswith(tuple(dropped_prefixes)):
            dropped.append(key)
            continue
        new = rename(key, depths)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
            origins[new] = key
    return renamed, unknown, dropped, origins
