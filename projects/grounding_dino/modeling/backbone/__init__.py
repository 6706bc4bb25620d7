"""Grounding DINO's image side: bodies (detectron2 ``Backbone``s registered in
``IMAGE_BACKBONE_REGISTRY``), the input projection neck, the sine position embedding, and the
converters of the official and transformers' image-side state dicts."""

from .neck import (
    InputProjectionNeck,
    convert_hf_input_proj_state_dict,
    convert_official_input_proj_state_dict,
)
from .position_encoding import PositionEmbeddingSine
from .resnet import ResNetBackbone
from .swin import (
    SWIN_VARIANTS,
    SwinBackbone,
    convert_hf_swin_state_dict,
    convert_official_swin_state_dict,
    swin_variant_from_sizes,
)
from .tiny_cnn import TinyCNNBackbone

__all__ = [
    "SWIN_VARIANTS",
    "InputProjectionNeck",
    "PositionEmbeddingSine",
    "ResNetBackbone",
    "SwinBackbone",
    "TinyCNNBackbone",
    "convert_hf_input_proj_state_dict",
    "convert_hf_swin_state_dict",
    "convert_official_input_proj_state_dict",
    "convert_official_swin_state_dict",
    "swin_variant_from_sizes",
]
