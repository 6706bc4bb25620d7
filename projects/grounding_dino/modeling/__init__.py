"""Grounding DINO modeling: the meta-architecture and its registered components."""

from . import backbone  # noqa: F401  (registers the image backbones)
from .decoder import CrossModalityDecoder
from .enhancer import FeatureEnhancer
from .meta_arch import GroundingDINO
from .query_selector import LanguageGuidedQuerySelector
from .registry import (
    DECODER_REGISTRY,
    FEATURE_ENHANCER_REGISTRY,
    IMAGE_BACKBONE_REGISTRY,
    QUERY_SELECTOR_REGISTRY,
    TEXT_ENCODER_REGISTRY,
)
from .text_encoder import BertTextEncoder

__all__ = [
    "GroundingDINO",
    "BertTextEncoder",
    "FeatureEnhancer",
    "LanguageGuidedQuerySelector",
    "CrossModalityDecoder",
    "IMAGE_BACKBONE_REGISTRY",
    "TEXT_ENCODER_REGISTRY",
    "FEATURE_ENHANCER_REGISTRY",
    "QUERY_SELECTOR_REGISTRY",
    "DECODER_REGISTRY",
]
