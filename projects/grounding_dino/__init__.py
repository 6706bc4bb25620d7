"""Grounding DINO for Detectron2.

``import grounding_dino`` registers the ``GroundingDINO`` meta-architecture (and
``GroundingDINOFromYacs``, the name earlier thin yamls use for the same model) in detectron2's
``META_ARCH_REGISTRY``, and the built-in components in their registries
(``grounding_dino.modeling.registry``).
"""

from . import modeling  # noqa: F401  (registers the meta-architecture and the components)
from .config import add_grounding_dino_config
from .modeling import GroundingDINO, GroundingDINOFromYacs, InferenceSettings
from .predictor import GroundingDINOPredictor

__version__ = "0.1.0"

__all__ = [
    "GroundingDINO",
    "GroundingDINOFromYacs",
    "GroundingDINOPredictor",
    "InferenceSettings",
    "add_grounding_dino_config",
]
