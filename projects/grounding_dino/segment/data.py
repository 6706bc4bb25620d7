"""
Training data of the box-prompted segmenter: a dataset mapper that turns a detectron2 dataset
dict with instance masks (COCO ``segmentation``: polygons or RLE) into SAM's inputs, through the
segmenter's own processor (the pre-processing the mask stage uses at inference), with box
prompts taken from the ground truth boxes plus a small jitter, as SAM's training does.
"""

import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode

from ..io.images import read_image_file

__all__ = ["SamBoxMapper", "jitter_boxes"]

logger = logging.getLogger(__name__)


def jitter_boxes(
    boxes: np.ndarray, image_size, rng: np.random.Generator, std: float, max_shift: float
) -> np.ndarray:
    """
    Box prompts as SAM trains them: each coordinate moved by Gaussian noise of ``std`` times
    the box's side, at most ``max_shift`` times the image's longest side, clipped to the image.

    Args:
        boxes: (K, 4) XYXY pixels.
        image_size: (H, W).
        std, max_shift: SAM: 0.1 and 20 px of 1024 (about 0.02).

    Returns:
        (K, 4) float32 boxes with x0 < x1 and y0 < y1.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sides = np.repeat(boxes[:, 2:] - boxes[:, :2], 2, axis=0).reshape(-1, 2, 2)
    sides = sides.transpose(0, 2, 1).reshape(-1, 4)  # (w, h, w, h) per box
    limit = max_shift * max(image_size)
    noise = np.clip(rng.normal(size=boxes.shape) * std * sides, -limit, limit)
    out = boxes + noise
    height, width = image_size
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)], 1).astype(np.float32)


class SamBoxMapper:
    """
    Maps a dataset dict with instance masks to the inputs of
    :class:`~grounding_dino.segment.training.SamForBoxTraining`::

        {"pixel_values": (3, S, S) float (the processor's, padded to its ``pad_size``),
         "input_boxes": (K, 4) float box prompts in the processor's coordinates,
         "gt_masks": (K, S, S) uint8 masks in the same frame (0 in the padding),
         "file_name": str, "height": int, "width": int}

    Records without a usable mask (none, or only crowd regions) give None, which detectron2's
    training loader replaces with another record; the first few are logged.
    """

    def __init__(
        self,
        processor,
        *,
        max_boxes: int = 16,
        box_noise: float = 0.1,
        box_noise_max: float = 0.02,
        image_format: str = "RGB",
        seed: Optional[int] = None,
    ):
        """
        Args:
            processor: the segmenter's ``SamProcessor``
                (:func:`~grounding_dino.segment.training.sam_processor`).
            max_boxes: masks per image at most (a random subset when there are more).
            box_noise, box_noise_max: the prompt jitter (:func:`jitter_boxes`).
            image_format: "RGB" (what the processor expects) or "BGR", read through the
                project's image reader (:func:`~grounding_dino.io.images.read_image_file`).
            seed: seed of the jitter and subsets (None: a fresh generator).
        """
        if max_boxes < 1:
            raise ValueError(f"SamBoxMapper: max_boxes must be >= 1, got {max_boxes}")
        self.processor = processor
        self.max_boxes = int(max_boxes)
        self.box_noise = float(box_noise)
        self.box_noise_max = float(box_noise_max)
        self.image_format = image_format
        self.rng = np.random.default_rng(seed)
        self._skipped = 0

    def _targets(self, record: Dict, image_size) -> Optional[tuple]:
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        annotations = [a for a in annotations if a.get("segmentation")]
        if not annotations:
            return None
        if len(annotations) > self.max_boxes:
            chosen = self.rng.choice(len(annotations), self.max_boxes, replace=False)
            annotations = [annotations[i] for i in sorted(chosen.tolist())]
        instances = utils.annotations_to_instances(annotations, image_size, mask_format="bitmask")
        boxes = np.stack(
            [
                BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in annotations
            ]
        )
        return boxes, instances.gt_masks.tensor

    def __call__(self, record: Dict) -> Optional[Dict]:
        record = copy.deepcopy(record)
        image = read_image_file(record["file_name"], format=self.image_format)
        utils.check_image_size(record, image)
        targets = self._targets(record, image.shape[:2])
        if targets is None:
            self._skipped += 1
            if self._skipped <= 5:
                logger.warning(f"SamBoxMapper: {record['file_name']} has no mask; skipped")
            return None
        boxes, masks = targets
        prompts = jitter_boxes(boxes, image.shape[:2], self.rng, self.box_noise, self.box_noise_max)
        inputs = self.processor(images=image, input_boxes=[prompts.tolist()], return_tensors="pt")
        resized = [int(v) for v in inputs["reshaped_input_sizes"][0]]
        padded = inputs["pixel_values"].shape[-2:]
        return {
            "pixel_values": inputs["pixel_values"][0],
            "input_boxes": inputs["input_boxes"][0].float(),
            "gt_masks": _resize_and_pad(masks, resized, padded),
            "file_name": record["file_name"],
            "height": image.shape[0],
            "width": image.shape[1],
        }


def _resize_and_pad(masks: torch.Tensor, resized: List[int], padded) -> torch.Tensor:
    """(K, H, W) bool masks -> (K, *padded) uint8: resized as the image was, padded with 0."""
    pad = (0, padded[1] - resized[1], 0, padded[0] - resized[0])
    if list(masks.shape[-2:]) == list(resized):
        # Not resized (the image is already the processor's size): the bilinear resize would be
        # the identity, and it is a third of the mapper's time on the demo's 256 px shapes.
        return F.pad(masks.to(torch.uint8), pad)
    out = F.interpolate(masks[:, None].float(), size=resized, mode="bilinear", align_corners=False)
    out = F.pad(out[:, 0], pad)
    return (out >= 0.5).to(torch.uint8)
