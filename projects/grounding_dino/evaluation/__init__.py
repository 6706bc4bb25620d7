"""Evaluation: zero-shot detection (COCO, ODinW, LVIS), referring expressions and Flickr30k
entities phrase grounding."""

from .build import EVALUATOR_TYPES, build_evaluator, register_evaluator_type
from .detection import ZeroShotDetectionEvaluator, ZeroShotLVISEvaluator, keep_topk_per_class
from .flickr30k import Flickr30kEvaluator, flickr_phrases, recall_at_k
from .rec import RECEvaluator, gt_box_from_input

__all__ = [
    "EVALUATOR_TYPES",
    "Flickr30kEvaluator",
    "RECEvaluator",
    "ZeroShotDetectionEvaluator",
    "ZeroShotLVISEvaluator",
    "build_evaluator",
    "flickr_phrases",
    "gt_box_from_input",
    "keep_topk_per_class",
    "recall_at_k",
    "register_evaluator_type",
]
