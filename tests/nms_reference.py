"""Class-wise NMS applied to a finished output: the reference that the tests hold the
post-processing's ``InferenceSettings.nms_threshold`` against (and the stub predictors' NMS)."""

from typing import Dict, Optional

from grounding_dino.modeling.nms import classwise_nms


def nms_output(output: Dict, iou_threshold: float, max_detections: Optional[int] = None) -> Dict:
    """
    :func:`classwise_nms` on one image's model output.

    Args:
        output: ``{"instances": Instances(pred_boxes, scores, pred_classes, ...),
            "phrases": [str] * N}`` as the model and ``GroundingDINOPredictor`` return it.
        iou_threshold, max_detections: see :func:`classwise_nms`.

    Returns:
        the same kind of dict with the kept detections (every ``Instances`` field and the
        phrases indexed alike), best score first.
    """
    instances = output["instances"]
    keep = classwise_nms(
        instances.pred_boxes.tensor,
        instances.scores,
        instances.pred_classes,
        iou_threshold,
        max_detections,
    )
    phrases = output.get("phrases")
    result = dict(output, instances=instances[keep])
    if phrases is not None:
        result["phrases"] = [phrases[i] for i in keep.tolist()]
    return result
