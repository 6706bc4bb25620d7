"""Registries of the swappable Grounding DINO components.

Each component is looked up by name from the lazy config's ``name`` field or instantiated
directly with ``L(Class)(...)``; the registries let user code plug in its own versions the
way detectron2's ``BACKBONE_REGISTRY`` does.
"""

from detectron2.utils.registry import Registry

IMAGE_BACKBONE_REGISTRY = Registry("GROUNDING_DINO_IMAGE_BACKBONE")
IMAGE_BACKBONE_REGISTRY.__doc__ = """Image backbones: image [B,3,H,W] -> multi-scale features."""

TEXT_ENCODER_REGISTRY = Registry("GROUNDING_DINO_TEXT_ENCODER")
TEXT_ENCODER_REGISTRY.__doc__ = """Text encoders: token ids -> token features [B,L,C]."""

FEATURE_ENHANCER_REGISTRY = Registry("GROUNDING_DINO_FEATURE_ENHANCER")
FEATURE_ENHANCER_REGISTRY.__doc__ = """Feature enhancers: fuse image and text features."""

QUERY_SELECTOR_REGISTRY = Registry("GROUNDING_DINO_QUERY_SELECTOR")
QUERY_SELECTOR_REGISTRY.__doc__ = """Language-guided query selectors: memory -> decoder queries."""

DECODER_REGISTRY = Registry("GROUNDING_DINO_DECODER")
DECODER_REGISTRY.__doc__ = """Cross-modality decoders: queries -> refined queries and boxes."""

__all__ = [
    "IMAGE_BACKBONE_REGISTRY",
    "TEXT_ENCODER_REGISTRY",
    "FEATURE_ENHANCER_REGISTRY",
    "QUERY_SELECTOR_REGISTRY",
    "DECODER_REGISTRY",
]
