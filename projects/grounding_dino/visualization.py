"""Drawing a predictor's output on its image with detectron2's ``Visualizer``."""

from typing import Dict

import numpy as np
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

__all__ = ["draw"]


def draw(image_bgr: np.ndarray, output: Dict) -> np.ndarray:
    """
    The boxes of ``output`` with "phrase score" labels, one colour per phrase, and their masks
    filled in the same colour when the instances have ``pred_masks`` (the mask stage's).

    Args:
        image_bgr: HxWx3 uint8 BGR array, the image the output is of.
        output: a predictor's ``{"instances": Instances(pred_boxes, scores[, pred_masks (N, H,
            W) bool]), "phrases"}``.

    Returns:
        the drawing, HxWx3 uint8 RGB.
    """
    instances = output["instances"].to("cpu")
    visualizer = Visualizer(image_bgr[:, :, ::-1])
    palette = colormap(rgb=True, maximum=1)
    phrases = output["phrases"]
    color_of = {p: palette[i % len(palette)] for i, p in enumerate(dict.fromkeys(phrases))}
    labels = [f"{p} {s:.2f}" for p, s in zip(phrases, instances.scores.tolist())]
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    drawn = visualizer.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        labels=labels,
        masks=masks,
        assigned_colors=[color_of[p] for p in phrases],
    )
    return drawn.get_image()
