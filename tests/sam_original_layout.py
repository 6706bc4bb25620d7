"""The key layout of the ORIGINAL SAM / SAM 2 checkpoints, written for the tests independently
of the converter (``grounding_dino.segment.convert_keys``).

The names follow the two authorities on them: transformers' own conversion scripts
(``models/sam/convert_sam_to_hf.py``, ``models/sam2/convert_sam2_to_hf.py``: their patterns map
the original names to transformers' ones) and the original modules (``segment_anything/modeling``:
``ImageEncoderViT`` ``blocks`` / ``neck.0..3``, ``PromptEncoder`` ``point_embeddings``,
``mask_downscaling``, ``MaskDecoder`` ``output_upscaling`` and its ``MLP`` heads ``layers.i``;
``sam2/modeling``: ``ImageEncoder.trunk`` (Hiera: ``pos_embed``, ``pos_embed_window``,
``blocks.i.norm1/attn.qkv/attn.proj/norm2/mlp.layers.0-1`` and ``proj`` where the width
changes), ``neck.convs.i.conv`` (FpnNeck), ``sam_prompt_encoder``, ``sam_mask_decoder`` (with
``conv_s0/1``, ``obj_score_token``, ``pred_obj_score_head``; attention ``out_proj``), and
``SAM2Base``'s ``no_mem_embed`` and video modules).

- :func:`sam_to_original` / :func:`sam2_to_original`: a transformers state dict -> the original
  layout (the inverse of the authoritative mapping, written as transformers -> original here).
- :data:`SAM21_VIDEO_KEYS`: real names of a ``sam2.1_hiera_*.pt`` file's video modules.
- :data:`SAM_VIT_H_EXAMPLES` / :data:`SAM21_HIERA_L_EXAMPLES`: literal (original, transformers)
  pairs of the released files, as transformers' converter maps them.
"""

import re

import torch

__all__ = [
    "sam_to_original",
    "sam2_to_original",
    "SAM21_VIDEO_KEYS",
    "SAM_VIT_H_EXAMPLES",
    "SAM21_HIERA_L_EXAMPLES",
]

# transformers fragment -> original fragment, applied in this order (the specific renames
# before the generic ``.layer_norm`` -> ``.norm`` that the converters apply to every ``.norm``).
_COMMON = [
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
    (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
    (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
    (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
    (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
    (r"\.upscale_conv1\.", ".output_upscaling.0."),
    (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
    (r"\.upscale_conv2\.", ".output_upscaling.3."),
]
_SAM = [
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"\.point_embed\.", ".point_embeddings."),
    (r"\.layer_norm", ".norm"),
]
_SAM2 = [
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"\.o_proj\.", ".out_proj."),
    # The 2-layer MLPs of the Hiera blocks and of the two-way transformer (sam2's ``MLP``).
    (r"\.mlp\.proj_in\.", ".mlp.layers.0."),
    (r"\.mlp\.proj_out\.", ".mlp.layers.1."),
    (r"\.layer_norm", ".norm"),
]
# The 3-layer MLP heads (as released): transformers' proj_in / layers.i / proj_out are
# layers.0 / i+1 / 2.
_HEADS = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"


def _heads_to_original(key: str) -> str:
    # layers.i first: the proj_in it would otherwise renumber becomes layers.0 after it.
    key = re.sub(rf"\.{_HEADS}\.layers\.(\d+)\.", lambda m: f".{m[1]}.layers.{int(m[2]) + 1}.", key)
    key = re.sub(rf"\.{_HEADS}\.proj_in\.", r".\1.layers.0.", key)
    return re.sub(rf"\.{_HEADS}\.proj_out\.", r".\1.layers.2.", key)


def _apply(rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def sam_to_original(state, normalization: bool = False):
    """A transformers ``SamModel`` state dict -> segment_anything's layout (with
    ``pixel_mean`` / ``pixel_std``, ImageNet's on 0..255, when ``normalization``)."""
    out = {}
    for key, value in state.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # transformers' tied copy of the one original matrix
        if key == "shared_image_embedding.positional_embedding":
            out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
            continue
        out[_heads_to_original(_apply(_COMMON + _SAM, key))] = value
    if normalization:
        out["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
        out["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return out


def sam2_to_original(state, video: bool = True):
    """A transformers ``Sam2Model`` state dict -> sam2's layout, with the video modules of a
    ``sam2.1`` file (:data:`SAM21_VIDEO_KEYS`, small random tensors) when ``video``."""
    out = {}
    for key, value in state.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue
        if key == "shared_image_embedding.positional_embedding":
            out["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
        elif key == "no_memory_embedding":
            out["no_mem_embed"] = value
        elif key == "prompt_encoder.point_embed.weight":  # (4, C) -> four nn.Embedding(1, C)
            for index in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{index}.weight"] = value[
                    index : index + 1
                ]
        else:
            out[_heads_to_original(_apply(_COMMON + _SAM2, key))] = value
    if video:
        generator = torch.Generator().manual_seed(0)
        for key in SAM21_VIDEO_KEYS:
            out[key] = torch.randn(4, generator=generator)
    return out


SAM21_VIDEO_KEYS = [
    "memory_attention.layers.0.self_attn.q_proj.weight",
    "memory_attention.layers.3.cross_attn_image.k_proj.bias",
    "memory_attention.layers.0.linear1.weight",
    "memory_attention.layers.0.norm3.weight",
    "memory_attention.norm.bias",
    "memory_encoder.mask_downsampler.encoder.0.weight",
    "memory_encoder.mask_downsampler.encoder.12.bias",
    "memory_encoder.pix_feat_proj.weight",
    "memory_encoder.fuser.layers.0.dwconv.weight",
    "memory_encoder.fuser.layers.1.gamma",
    "memory_encoder.out_proj.weight",
    "mask_downsample.weight",
    "obj_ptr_proj.layers.0.weight",
    "obj_ptr_proj.layers.2.bias",
    "obj_ptr_tpos_proj.weight",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
]
"""Keys of the video modules of a ``sam2.1_hiera_*.pt`` (``SAM2Base``: memory attention and
encoder, mask downsampler, object-pointer projections, temporal encodings, no-object pointers)."""

SAM_VIT_H_EXAMPLES = [
    ("image_encoder.patch_embed.proj.weight", "vision_encoder.patch_embed.projection.weight"),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.0.norm1.weight", "vision_encoder.layers.0.layer_norm1.weight"),
    ("image_encoder.blocks.0.attn.qkv.weight", "vision_encoder.layers.0.attn.qkv.weight"),
    ("image_encoder.blocks.7.attn.rel_pos_h", "vision_encoder.layers.7.attn.rel_pos_h"),
    ("image_encoder.blocks.31.attn.rel_pos_w", "vision_encoder.layers.31.attn.rel_pos_w"),
    ("image_encoder.blocks.31.attn.proj.bias", "vision_encoder.layers.31.attn.proj.bias"),
    ("image_encoder.blocks.12.norm2.bias", "vision_encoder.layers.12.layer_norm2.bias"),
    ("image_encoder.blocks.12.mlp.lin1.weight", "vision_encoder.layers.12.mlp.lin1.weight"),
    ("image_encoder.blocks.12.mlp.lin2.bias", "vision_encoder.layers.12.mlp.lin2.bias"),
    ("image_encoder.neck.0.weight", "vision_encoder.neck.conv1.weight"),
    ("image_encoder.neck.1.weight", "vision_encoder.neck.layer_norm1.weight"),
    ("image_encoder.neck.2.weight", "vision_encoder.neck.conv2.weight"),
    ("image_encoder.neck.3.bias", "vision_encoder.neck.layer_norm2.bias"),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.0.weight", "prompt_encoder.point_embed.0.weight"),
    ("prompt_encoder.point_embeddings.3.weight", "prompt_encoder.point_embed.3.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("prompt_encoder.mask_downscaling.0.weight", "prompt_encoder.mask_embed.conv1.weight"),
    ("prompt_encoder.mask_downscaling.1.bias", "prompt_encoder.mask_embed.layer_norm1.bias"),
    ("prompt_encoder.mask_downscaling.3.weight", "prompt_encoder.mask_embed.conv2.weight"),
    ("prompt_encoder.mask_downscaling.4.weight", "prompt_encoder.mask_embed.layer_norm2.weight"),
    ("prompt_encoder.mask_downscaling.6.bias", "prompt_encoder.mask_embed.conv3.bias"),
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    (
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
    ),
    (
        "mask_decoder.transformer.layers.0.self_attn.out_proj.weight",
        "mask_decoder.transformer.layers.0.self_attn.out_proj.weight",
    ),
    (
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.bias",
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.bias",
    ),
    (
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight",
    ),
    (
        "mask_decoder.transformer.layers.0.norm1.weight",
        "mask_decoder.transformer.layers.0.layer_norm1.weight",
    ),
    (
        "mask_decoder.transformer.layers.1.norm4.bias",
        "mask_decoder.transformer.layers.1.layer_norm4.bias",
    ),
    (
        "mask_decoder.transformer.layers.0.mlp.lin1.weight",
        "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    ),
    (
        "mask_decoder.transformer.final_attn_token_to_image.out_proj.bias",
        "mask_decoder.transformer.final_attn_token_to_image.out_proj.bias",
    ),
    (
        "mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.transformer.layer_norm_final_attn.weight",
    ),
    ("mask_decoder.output_upscaling.0.weight", "mask_decoder.upscale_conv1.weight"),
    ("mask_decoder.output_upscaling.1.weight", "mask_decoder.upscale_layer_norm.weight"),
    ("mask_decoder.output_upscaling.3.bias", "mask_decoder.upscale_conv2.bias"),
    (
        "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.0.proj_in.weight",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.3.layers.1.bias",
        "mask_decoder.output_hypernetworks_mlps.3.layers.0.bias",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight",
        "mask_decoder.output_hypernetworks_mlps.3.proj_out.weight",
    ),
    (
        "mask_decoder.iou_prediction_head.layers.0.weight",
        "mask_decoder.iou_prediction_head.proj_in.weight",
    ),
    (
        "mask_decoder.iou_prediction_head.layers.1.bias",
        "mask_decoder.iou_prediction_head.layers.0.bias",
    ),
    (
        "mask_decoder.iou_prediction_head.layers.2.weight",
        "mask_decoder.iou_prediction_head.proj_out.weight",
    ),
]
"""(original, transformers) key pairs of ``sam_vit_h_4b8939.pth`` (32 blocks, global attention
at 7, 15, 23, 31 with relative positions in every block)."""

SAM21_HIERA_L_EXAMPLES = [
    ("image_encoder.trunk.pos_embed", "vision_encoder.backbone.pos_embed"),
    ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
    (
        "image_encoder.trunk.patch_embed.proj.weight",
        "vision_encoder.backbone.patch_embed.projection.weight",
    ),
    (
        "image_encoder.trunk.blocks.0.norm1.weight",
        "vision_encoder.backbone.blocks.0.layer_norm1.weight",
    ),
    (
        "image_encoder.trunk.blocks.0.attn.qkv.weight",
        "vision_encoder.backbone.blocks.0.attn.qkv.weight",
    ),
    (
        "image_encoder.trunk.blocks.0.attn.proj.bias",
        "vision_encoder.backbone.blocks.0.attn.proj.bias",
    ),
    (
        "image_encoder.trunk.blocks.23.norm2.bias",
        "vision_encoder.backbone.blocks.23.layer_norm2.bias",
    ),
    (
        "image_encoder.trunk.blocks.0.mlp.layers.0.weight",
        "vision_encoder.backbone.blocks.0.mlp.proj_in.weight",
    ),
    (
        "image_encoder.trunk.blocks.47.mlp.layers.1.bias",
        "vision_encoder.backbone.blocks.47.mlp.proj_out.bias",
    ),
    # The first block of stages 2, 3, 4 (blocks 2, 8, 44 of 2+6+36+4) widens (proj) and pools q.
    ("image_encoder.trunk.blocks.2.proj.weight", "vision_encoder.backbone.blocks.2.proj.weight"),
    ("image_encoder.trunk.blocks.8.proj.bias", "vision_encoder.backbone.blocks.8.proj.bias"),
    ("image_encoder.trunk.blocks.44.proj.weight", "vision_encoder.backbone.blocks.44.proj.weight"),
    (
        "image_encoder.trunk.blocks.44.attn.qkv.weight",
        "vision_encoder.backbone.blocks.44.attn.qkv.weight",
    ),
    ("image_encoder.neck.convs.0.conv.weight", "vision_encoder.neck.convs.0.weight"),
    ("image_encoder.neck.convs.3.conv.bias", "vision_encoder.neck.convs.3.bias"),
    (
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("sam_prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("sam_prompt_encoder.mask_downscaling.0.weight", "prompt_encoder.mask_embed.conv1.weight"),
    ("sam_prompt_encoder.mask_downscaling.4.bias", "prompt_encoder.mask_embed.layer_norm2.bias"),
    ("sam_prompt_encoder.mask_downscaling.6.weight", "prompt_encoder.mask_embed.conv3.weight"),
    ("sam_mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("sam_mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    ("sam_mask_decoder.obj_score_token.weight", "mask_decoder.obj_score_token.weight"),
    (
        "sam_mask_decoder.transformer.layers.0.self_attn.out_proj.weight",
        "mask_decoder.transformer.layers.0.self_attn.o_proj.weight",
    ),
    (
        "sam_mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.bias",
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.bias",
    ),
    (
        "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.bias",
    ),
    (
        "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight",
        "mask_decoder.transformer.layers.0.mlp.proj_in.weight",
    ),
    (
        "sam_mask_decoder.transformer.layers.1.mlp.layers.1.bias",
        "mask_decoder.transformer.layers.1.mlp.proj_out.bias",
    ),
    (
        "sam_mask_decoder.transformer.layers.0.norm1.weight",
        "mask_decoder.transformer.layers.0.layer_norm1.weight",
    ),
    (
        "sam_mask_decoder.transformer.layers.1.norm4.bias",
        "mask_decoder.transformer.layers.1.layer_norm4.bias",
    ),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.weight",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.weight",
    ),
    (
        "sam_mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.transformer.layer_norm_final_attn.weight",
    ),
    ("sam_mask_decoder.output_upscaling.0.weight", "mask_decoder.upscale_conv1.weight"),
    ("sam_mask_decoder.output_upscaling.1.bias", "mask_decoder.upscale_layer_norm.bias"),
    ("sam_mask_decoder.output_upscaling.3.weight", "mask_decoder.upscale_conv2.weight"),
    ("sam_mask_decoder.conv_s0.weight", "mask_decoder.conv_s0.weight"),
    ("sam_mask_decoder.conv_s1.bias", "mask_decoder.conv_s1.bias"),
    (
        "sam_mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.0.proj_in.weight",
    ),
    (
        "sam_mask_decoder.output_hypernetworks_mlps.2.layers.1.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
    ),
    (
        "sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
        "mask_decoder.output_hypernetworks_mlps.3.proj_out.bias",
    ),
    (
        "sam_mask_decoder.iou_prediction_head.layers.0.weight",
        "mask_decoder.iou_prediction_head.proj_in.weight",
    ),
    (
        "sam_mask_decoder.iou_prediction_head.layers.2.bias",
        "mask_decoder.iou_prediction_head.proj_out.bias",
    ),
    (
        "sam_mask_decoder.pred_obj_score_head.layers.0.weight",
        "mask_decoder.pred_obj_score_head.proj_in.weight",
    ),
    (
        "sam_mask_decoder.pred_obj_score_head.layers.1.bias",
        "mask_decoder.pred_obj_score_head.layers.0.bias",
    ),
    (
        "sam_mask_decoder.pred_obj_score_head.layers.2.weight",
        "mask_decoder.pred_obj_score_head.proj_out.weight",
    ),
    ("no_mem_embed", "no_memory_embedding"),
]
"""(original, transformers) key pairs of ``sam2.1_hiera_large.pt`` (Hiera stages of 2, 6, 36
and 4 blocks, widths 144..1152; high-resolution features and object scores on). Its four
``sam_prompt_encoder.point_embeddings.{0..3}.weight`` ((1, 256) each) become one
``prompt_encoder.point_embed.weight`` (4, 256)."""
