"""Grounding DINO for Detectron2.

``import grounding_dino`` registers the ``GroundingDINO`` meta-architecture in detectron2's
``META_ARCH_REGISTRY`` and the component registries.
"""

from . import modeling  # noqa: F401  (registers the meta-architecture)
from .config import add_grounding_dino_config
from .modeling import GroundingDINO
from .predictor import GroundingDINOPredictor

__version__ = "0.1.0"

__all__ = ["GroundingDINO", "GroundingDINOPredictor", "add_grounding_dino_config"]
