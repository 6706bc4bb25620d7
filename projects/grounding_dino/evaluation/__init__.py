"""Evaluation: zero-shot detection (COCO, ODinW, LVIS) and referring expressions."""

from .build import EVALUATOR_TYPES, build_evaluator, register_evaluator_type
from .detection import ZeroShotDetectionEvaluator, ZeroShotLVISEvaluator, keep_topk_per_class
from .rec import RECEvaluator, gt_box_from_input

__all__ = [
    "EVALUATOR_TYPES",
    "RECEvaluator",
    "ZeroShotDetectionEvaluator",
    "ZeroShotLVISEvaluator",
    "build_evaluator",
    "gt_box_from_input",
    "keep_topk_per_class",
    "register_evaluator_type",
]
