"""
Evaluation of ``train_net.py`` (periodic and ``--eval-only``): detections independent of the
model's display settings, results printed and written to ``metrics.json``.

``model.box_threshold`` and ``model.max_detections`` decide what a user sees (the demo, the
predictors). The evaluation must not depend on them: a box under the display threshold still
counts for AP, and REC scores the best box of an expression whatever its score. So the
evaluation passes the model :func:`evaluation_settings`: no score threshold and at least
``EVAL_MAX_DETECTIONS`` (300, as the official COCO evaluation) detections per image; each
evaluator then keeps what its protocol keeps (COCO ``max_dets_per_image``, REC top-k). The
model itself is not changed.
"""

import logging
import os
from typing import Dict, Mapping

from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter
from torch import nn

from ..evaluation.inference import EVAL_MAX_DETECTIONS, InferenceWithSettings, evaluation_settings
from ..evaluation.masks import EVAL_MAX_MASKS, InferenceWithMasks

__all__ = [
    "EVAL_MAX_DETECTIONS",
    "evaluation_settings",
    "InferenceWithSettings",
    "evaluate",
    "write_eval_metrics",
]

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    data_loader,
    evaluator,
    mask_stage=None,
    max_masks_per_image: int = EVAL_MAX_MASKS,
) -> Dict:
    """
    :func:`~detectron2.evaluation.inference_on_dataset` with :func:`evaluation_settings`; the
    main process prints the results (``print_csv_format``; the evaluators log their tables).

    Args:
        mask_stage: a :class:`~grounding_dino.segment.MaskStage` that turns the
            ``max_masks_per_image`` best boxes of each image into masks
            (:class:`~grounding_dino.evaluation.masks.InferenceWithMasks`); the COCO evaluator
            then reports ``segm`` beside ``bbox``. None: boxes only.

    Returns:
        the evaluator's results (``{}`` on the other processes).
    """
    wrapped = InferenceWithSettings(model, evaluation_settings(model))
    if mask_stage is not None:
        wrapped = InferenceWithMasks(wrapped, mask_stage, max_masks_per_image)
    results = inference_on_dataset(wrapped, data_loader, evaluator)
    if comm.is_main_process():
        if results:
            print_csv_format(results)
        else:
            logger.warning(f"{type(evaluator).__name__} returned no results")
    return results


def write_eval_metrics(results: Mapping, output_dir: str, iteration: int) -> str:
    """
    Appends the results as one line to ``output_dir/metrics.json`` with detectron2's
    :class:`JSONWriter`, the line the evaluation hook of a training writes:
    ``{"iteration": iteration, "bbox/AP": ..., "bbox/AP50": ..., ...}``. Main process only.

    Returns:
        the path of ``metrics.json`` ("" on the other processes or without results).
    """
    if not comm.is_main_process() or not results:
        return ""
    flattened = flatten_results_dict(results)
    scalars = {}
    for key, value in flattened.items():
        try:
            scalars[key] = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Evaluation result {key}={value!r} is not a number") from error
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "metrics.json")
    writer = JSONWriter(path)
    try:
        with EventStorage(iteration) as storage:
            storage.put_scalars(**scalars, smoothing_hint=False)
            writer.write()
    finally:
        writer.close()
    logger.info(f"Wrote the evaluation results of iteration {iteration} to {path}")
    return path
