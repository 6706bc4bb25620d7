"""The official test-time resize (shortest edge 800, longest at most 1333) as a detectron2
augmentation."""

import logging
from typing import Sequence, Tuple

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from omegaconf import OmegaConf
from PIL import Image

__all__ = [
    "official_output_size",
    "OfficialResize",
    "official_resize_from_lazy_config",
    "resize_uint8_image",
]

logger = logging.getLogger(__name__)

_MISSING = object()


def official_output_size(height: int, width: int, size: int, max_size: int) -> Tuple[int, int]:
    """
    The output (height, width) of the official ``RandomResize([size], max_size)``: the short
    side becomes ``size`` unless the long side would pass ``max_size``; the long side is
    truncated to an int, as the official code does.
    """
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class OfficialResize(T.Augmentation):
    """Resizes like the official inference pipeline (PIL bilinear)."""

    def __init__(self, short_edge: int, max_size: int):
        super().__init__()
        self.short_edge = short_edge
        self.max_size = max_size

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        new_h, new_w = official_output_size(height, width, self.short_edge, self.max_size)
        return T.ResizeTransform(height, width, new_h, new_w, Image.BILINEAR)


def official_resize_from_lazy_config(cfg) -> OfficialResize:
    """
    The test-time resize of a lazy config, the one the evaluation applies: the
    :class:`OfficialResize` of ``dataloader.test.mapper.augmentations``, or the official
    800 / 1333 for a config without ``dataloader.test`` (an inference config).

    Raises:
        ValueError: ``dataloader.test`` exists but its mapper's augmentations are missing, or
            are not exactly one :class:`OfficialResize` (the predictors apply that resize
            only, so their pixels would differ from the evaluation's).
    """
    dataloader = cfg.get("dataloader") if hasattr(cfg, "get") else None
    if not dataloader or "test" not in dataloader:
        logger.info(
            "The config has no dataloader.test: images are resized as the official inference "
            "(shortest edge 800, longest at most 1333)"
        )
        return OfficialResize(800, 1333)
    key = "dataloader.test.mapper.augmentations"
    node = OmegaConf.select(cfg, key, default=_MISSING)
    if node is _MISSING:
        raise ValueError(f"The config has dataloader.test but no {key}; it sets the test resize")
    augmentations = instantiate(node)
    augmentations = list(augmentations) if isinstance(augmentations, Sequence) else [augmentations]
    if len(augmentations) != 1 or not isinstance(augmentations[0], OfficialResize):
        raise ValueError(
            f"{key} must be one OfficialResize (e.g. L(build_test_augmentations)(min_size=800, "
            f"max_size=1333)), got {augmentations!r}"
        )
    return augmentations[0]


def resize_uint8_image(image: torch.Tensor, augmentation) -> torch.Tensor:
    """
    Applies a detectron2 augmentation to a CPU [3, H, W] image with 0-255 values (uint8, or
    float as ``DefaultPredictor`` gives), on uint8 pixels as the dataset mappers and
    ``GroundingDINOPredictor`` do. Returns a uint8 [3, H', W'] tensor.
    """
    if image.dtype != torch.uint8:
        image = image.round().clamp(0, 255).to(torch.uint8)
    array = image.permute(1, 2, 0).numpy()
    resized = augmentation.get_transform(array).apply_image(array)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
