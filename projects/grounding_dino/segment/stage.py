"""
The mask stage: a box-prompted segmenter run after the detector (Grounded-SAM).

transformers' ``SamModel``, ``SamHQModel`` and ``Sam2Model`` do the work, with their own
processors for the image pre-processing, the box coordinates and the mask post-processing; this
module only schedules them: the image embedding is computed once per image, then the image's
boxes go through the prompt encoder and mask decoder in batches of ``box_batch_size``, one mask
per box (``multimask_output=False``).
"""

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from detectron2.structures import Instances

from ..devices import resolve_device
from ..precision import check_precision, precision_context
from .loading import SegmenterKind, load_segmenter

__all__ = ["MaskStage", "MaskOutput", "add_instances_masks"]

logger = logging.getLogger(__name__)


@dataclass
class MaskOutput:
    """
    The masks of one image's boxes.

    Attributes:
        masks: (N, H, W) bool, image size, on the CPU: ``logits > mask_threshold``.
        scores: (N,) float32: the segmenter's predicted IoU of each mask.
        logits: (N, H, W) float32 mask logits at image size (before the threshold), on the CPU;
            None when the call asked for ``keep_logits=False``.
    """

    masks: torch.Tensor
    scores: torch.Tensor
    logits: Optional[torch.Tensor]


class MaskStage:
    """
    Box-prompted segmenter (transformers ``SamModel`` / ``SamHQModel`` / ``Sam2Model``) run
    after the detector: one image embedding per image, all boxes through the mask decoder in
    batches.

    Example::

        stage = MaskStage.from_pretrained("sam-vit-base")         # a local transformers folder
        out = stage(image_rgb, instances.pred_boxes.tensor)       # (N, 4) XYXY pixels
        out.masks                                                 # (N, H, W) bool

    Attributes:
        kind: "sam", "sam_hq" or "sam2" (config.json's ``model_type``).
        device: where the segmenter runs.
        dtype: the precision mode (:mod:`grounding_dino.precision`).
        box_batch_size: boxes per mask-decoder call.
        mask_threshold: logit above which a pixel is in the mask.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        kind: SegmenterKind,
        *,
        device="cpu",
        dtype: str = "fp32",
        box_batch_size: int = 64,
        mask_threshold: float = 0.0,
        allow_emulated_bf16: bool = False,
    ):
        """
        Args:
            model: a transformers ``SamModel``, ``SamHQModel`` or ``Sam2Model``.
            processor: its ``SamProcessor`` / ``SamHQProcessor`` / ``Sam2Processor``.
            kind: the family (``loading.SEGMENTER_KINDS[model.config.model_type]``).
            device: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when available); a CUDA
                device without CUDA is an error (:func:`~grounding_dino.devices.resolve_device`).
            dtype: "fp32", "bf16" or "fp16" (autocast, as the detector's ``--dtype``).
            box_batch_size: boxes per mask-decoder call (memory grows with it).
            mask_threshold: logit threshold of the masks.
            allow_emulated_bf16: as :func:`~grounding_dino.precision.check_precision`.

        Raises:
            ValueError: ``box_batch_size`` < 1, CUDA is asked for but absent, or the precision
                mode is not offered on the device.
        """
        if int(box_batch_size) < 1:
            raise ValueError(f"box_batch_size must be at least 1, got {box_batch_size}")
        self.device = torch.device(resolve_device(str(device)))
        self.dtype = check_precision(dtype, self.device, allow_emulated_bf16=allow_emulated_bf16)
        self.kind_spec = kind
        self.kind = kind.name
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.box_batch_size = int(box_batch_size)
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device="cpu",
        dtype: str = "fp32",
        box_batch_size: int = 64,
        mask_threshold: float = 0.0,
        allow_emulated_bf16: bool = False,
    ) -> "MaskStage":
        """
        Loads a segmenter folder (config.json + weights + preprocessor_config.json), as
        ``save_pretrained`` or ``python -m grounding_dino.segment.convert`` write it.

        Raises:
            FileNotFoundError: the folder or one of its files is missing (named).
            ValueError: config.json's ``model_type`` is not sam / sam_hq / sam2, or the
                weights do not match the model (keys named); as ``__init__``.
        """
        kind, model, processor = load_segmenter(path)
        logger.info("mask stage: %s from %s on %s (%s)", kind.name, path, device, dtype)
        return cls(
            model,
            processor,
            kind,
            device=device,
            dtype=dtype,
            box_batch_size=box_batch_size,
            mask_threshold=mask_threshold,
            allow_emulated_bf16=allow_emulated_bf16,
        )

    def _processor_inputs(self, image_rgb: np.ndarray, boxes: torch.Tensor):
        box_lists = [boxes.tolist()] if len(boxes) else None
        return self.processor(
            images=image_rgb,
            input_boxes=box_lists,
            return_tensors="pt",
            input_data_format="channels_last",
        )

    def _post_process(self, low_res: torch.Tensor, inputs) -> torch.Tensor:
        """(1, n, 1, h, w) low-resolution logits -> (n, H, W) float32 logits at image size."""
        sizes = [inputs["original_sizes"]]
        if self.kind_spec.post_process_needs_resized_size:
            sizes.append(inputs["reshaped_input_sizes"])
        (logits,) = self.processor.post_process_masks(low_res.float(), *sizes, binarize=False)
        return logits[:, 0]

    @torch.no_grad()
    def __call__(
        self, image_rgb: np.ndarray, boxes: torch.Tensor, *, keep_logits: bool = True
    ) -> MaskOutput:
        """
        Args:
            image_rgb: (H, W, 3) uint8 RGB image.
            boxes: (N, 4) float XYXY boxes in the image's pixels (e.g. ``pred_boxes.tensor``).
            keep_logits: return the (N, H, W) logits too (False saves their memory).

        Returns:
            :class:`MaskOutput`; N == 0 gives masks of shape (0, H, W) and scores (0,).

        Raises:
            ValueError: the image is not (H, W, 3) uint8, or the boxes are not (N, 4) finite.
        """
        image_rgb = _check_image(image_rgb)
        boxes = _check_boxes(boxes)
        height, width = image_rgb.shape[:2]
        if len(boxes) == 0:
            empty = torch.zeros((0, height, width))
            return MaskOutput(empty.bool(), torch.zeros(0), empty if keep_logits else None)
        inputs = self._processor_inputs(image_rgb, boxes)
        with precision_context(self.dtype, self.device):
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        decoder_inputs = self.kind_spec.decoder_inputs(embeddings)
        all_boxes = inputs["input_boxes"].to(self.device)
        masks, scores, logits = [], [], []
        for start in range(0, len(boxes), self.box_batch_size):
            with precision_context(self.dtype, self.device):
                output = self.model(
                    input_boxes=all_boxes[:, start : start + self.box_batch_size],
                    multimask_output=False,
                    **decoder_inputs,
                )
            chunk_logits = self._post_process(output.pred_masks, inputs)
            masks.append((chunk_logits > self.mask_threshold).cpu())
            scores.append(output.iou_scores[0, :, 0].float().cpu())
            if keep_logits:
                logits.append(chunk_logits.cpu())
        return MaskOutput(
            torch.cat(masks), torch.cat(scores), torch.cat(logits) if keep_logits else None
        )

    def __repr__(self) -> str:
        return (
            f"MaskStage(kind={self.kind!r}, device={str(self.device)!r}, dtype={self.dtype!r}, "
            f"box_batch_size={self.box_batch_size}, mask_threshold={self.mask_threshold})"
        )


def _check_image(image_rgb) -> np.ndarray:
    if (
        not isinstance(image_rgb, np.ndarray)
        or image_rgb.ndim != 3
        or image_rgb.shape[2] != 3
        or image_rgb.dtype != np.uint8
    ):
        what = (
            f"{image_rgb.dtype} array of shape {image_rgb.shape}"
            if isinstance(image_rgb, np.ndarray)
            else type(image_rgb).__name__
        )
        raise ValueError(f"The mask stage needs an (H, W, 3) uint8 RGB image, got a {what}")
    return image_rgb


def _check_boxes(boxes) -> torch.Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu()
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"The mask stage needs (N, 4) XYXY boxes, got shape {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("The mask stage got boxes with NaN or infinite coordinates")
    return boxes


def add_instances_masks(instances: Instances, image_rgb: np.ndarray, stage: MaskStage) -> Instances:
    """
    Fills ``instances.pred_masks`` ((N, H, W) bool, image size) and ``instances.mask_scores``
    ((N,) float32, the segmenter's predicted IoU) from ``instances.pred_boxes`` (in place).

    Args:
        instances: detections in the pixels of ``image_rgb`` (``image_size`` (H, W)).
        image_rgb: (H, W, 3) uint8 RGB image the boxes are in.
        stage: the segmenter.

    Returns:
        ``instances``.

    Raises:
        ValueError: the instances' image size is not the image's.
    """
    if tuple(instances.image_size) != tuple(image_rgb.shape[:2]):
        raise ValueError(
            f"The instances are for an image of {tuple(instances.image_size)} but the image given "
            f"to the mask stage is {tuple(image_rgb.shape[:2])}"
        )
    device = instances.pred_boxes.tensor.device
    output = stage(image_rgb, instances.pred_boxes.tensor.detach().float().cpu(), keep_logits=False)
    instances.pred_masks = output.masks.to(device)
    instances.mask_scores = output.scores.to(device)
    return instances
