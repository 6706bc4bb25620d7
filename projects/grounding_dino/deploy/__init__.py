"""Running exported Grounding DINO graphs: :class:`OnnxPredictor` (ONNX Runtime)."""

from .onnx_predictor import OnnxPredictor, onnx_feeds

__all__ = ["OnnxPredictor", "onnx_feeds"]
