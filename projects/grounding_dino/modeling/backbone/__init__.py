"""Image backbones: Swin Transformer, input projections and sine position embeddings."""

from .image_backbone import (
    SwinImageBackbone,
    convert_hf_image_backbone_state_dict,
    convert_hf_input_proj_state_dict,
    convert_official_image_backbone_state_dict,
    convert_official_input_proj_state_dict,
)
from .position_encoding import PositionEmbeddingSineHW
from .resnet import ResNetBody, ResNetImageBackbone
from .swin import (
    SWIN_VARIANTS,
    SwinTransformer,
    build_swin_transformer,
    convert_hf_swin_state_dict,
    convert_official_swin_state_dict,
)

__all__ = [
    "SWIN_VARIANTS",
    "PositionEmbeddingSineHW",
    "ResNetBody",
    "ResNetImageBackbone",
    "SwinImageBackbone",
    "SwinTransformer",
    "build_swin_transformer",
    "convert_hf_image_backbone_state_dict",
    "convert_hf_input_proj_state_dict",
    "convert_hf_swin_state_dict",
    "convert_official_image_backbone_state_dict",
    "convert_official_input_proj_state_dict",
    "convert_official_swin_state_dict",
]
