"""The official test-time resize (shortest edge 800, longest at most 1333) as a detectron2
augmentation."""

from typing import Tuple

import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["official_output_size", "OfficialResize"]


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

    def __init__(self, short_edge: int = 800, max_size: int = 1333):
        super().__init__()
        self.short_edge = short_edge
        self.max_size = max_size

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        new_h, new_w = official_output_size(height, width, self.short_edge, self.max_size)
        return T.ResizeTransform(height, width, new_h, new_w, Image.BILINEAR)
