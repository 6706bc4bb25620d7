"""Grounding DINO modeling: the meta-architecture, its registries and its components.

Importing this package registers the built-in components (image bodies, text encoder, feature
enhancer, query selector, decoder) in their registries and ``GroundingDINO`` in detectron2's
``META_ARCH_REGISTRY``.
"""

from . import backbone  # noqa: F401  (registers the image bodies)
from .decoder import CrossModalityDecoder
from .enhancer import FeatureEnhancer
from .meta_arch import GroundingDINO, GroundingDINOFromYacs
from .postprocessing import grounding_postprocess
from .query_selector import LanguageGuidedQuerySelector
from .registry import (
    DECODER_REGISTRY,
    FEATURE_ENHANCER_REGISTRY,
    IMAGE_BACKBONE_REGISTRY,
    QUERY_SELECTOR_REGISTRY,
    TEXT_ENCODER_REGISTRY,
    build_decoder,
    build_enhancer,
    build_from_registry,
    build_image_backbone,
    build_query_selector,
    build_text_encoder,
)
from .settings import InferenceSettings
from .structures import EncodedText, ImageTokens, MultiScaleFeatures
from .text_encoder import BertTextEncoder

__all__ = [
    "GroundingDINO",
    "GroundingDINOFromYacs",
    "InferenceSettings",
    "grounding_postprocess",
    "BertTextEncoder",
    "FeatureEnhancer",
    "LanguageGuidedQuerySelector",
    "CrossModalityDecoder",
    "MultiScaleFeatures",
    "ImageTokens",
    "EncodedText",
    "IMAGE_BACKBONE_REGISTRY",
    "TEXT_ENCODER_REGISTRY",
    "FEATURE_ENHANCER_REGISTRY",
    "QUERY_SELECTOR_REGISTRY",
    "DECODER_REGISTRY",
    "build_from_registry",
    "build_image_backbone",
    "build_text_encoder",
    "build_enhancer",
    "build_query_selector",
    "build_decoder",
]
