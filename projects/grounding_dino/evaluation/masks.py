"""
Evaluation with the mask stage (Grounded-SAM): the detector's boxes turned into masks by a
box-prompted segmenter (:class:`~grounding_dino.segment.MaskStage`), so that the COCO
evaluator reports ``segm`` AP beside ``bbox`` AP.

The box AP keeps every detection the evaluation asks for (300 per image); masks are made for
the ``max_masks_per_image`` highest-scoring ones (COCO's mask AP counts at most 100 per image),
because each box costs a pass of the mask decoder.
"""

import logging
from typing import Dict, List

import torch
from torch import nn

from ..io.images import read_image_file

__all__ = ["EVAL_MAX_MASKS", "InferenceWithMasks"]

logger = logging.getLogger(__name__)

EVAL_MAX_MASKS = 100
"""Masks per image in the evaluation (COCO's ``maxDets`` of mask AP)."""


class InferenceWithMasks(nn.Module):
    """
    ``model`` followed by the mask stage: each output keeps its ``"instances"`` (all the
    detections, for the box AP) and gains ``"mask_instances"``: its ``max_masks_per_image``
    highest-scoring detections with ``pred_masks`` ((K, H, W) bool, the input's ``height`` x
    ``width``) and ``mask_scores``. The segmenter reads each image from its ``file_name`` (the
    original pixels the boxes are in).
    """

    def __init__(self, model: nn.Module, stage, max_masks_per_image: int = EVAL_MAX_MASKS):
        super().__init__()
        if int(max_masks_per_image) < 1:
            raise ValueError(f"max_masks_per_image must be >= 1, got {max_masks_per_image}")
        self.model = model
        self.stage = stage
        self.max_masks_per_image = int(max_masks_per_image)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        from ..segment import add_instances_masks

        outputs = self.model(batched_inputs)
        for inputs, output in zip(batched_inputs, outputs):
            if "file_name" not in inputs:
                raise ValueError(
                    "The mask stage reads each image from its 'file_name', which an input of "
                    f"image_id={inputs.get('image_id')} does not have"
                )
            image = read_image_file(inputs["file_name"], format="RGB")
            instances = output["instances"].to(torch.device("cpu"))
            if tuple(instances.image_size) != image.shape[:2]:
                raise ValueError(
                    f"{inputs['file_name']} is {image.shape[1]}x{image.shape[0]} but its "
                    f"detections are for {instances.image_size[1]}x{instances.image_size[0]}"
                )
            order = torch.argsort(instances.scores, descending=True, stable=True)
            top = instances[order[: self.max_masks_per_image]]
            output["mask_instances"] = add_instances_masks(top, image, self.stage)
        return outputs
