"""Running exported Grounding DINO graphs: :class:`OnnxPredictor` (ONNX Runtime)."""

from .onnx_predictor import OnnxPredictor

__all__ = ["OnnxPredictor"]
