"""Grounding DINO's image side: bodies (detectron2 ``Backbone``s registered in
``IMAGE_BACKBONE_REGISTRY``), the input projection neck and the sine position embedding. The
converters of the official and transformers' image-side state dicts are in
``grounding_dino.convert`` (``swin_sources`` and ``keys``)."""

from .neck import InputProjectionNeck
from .position_encoding import PositionEmbeddingSine
from .resnet import ResNetBackbone
from .swin import SWIN_VARIANTS, SwinBackbone, swin_variant_from_sizes
from .tiny_cnn import TinyCNNBackbone

__all__ = [
    "SWIN_VARIANTS",
    "InputProjectionNeck",
    "PositionEmbeddingSine",
    "ResNetBackbone",
    "SwinBackbone",
    "TinyCNNBackbone",
    "swin_variant_from_sizes",
]
