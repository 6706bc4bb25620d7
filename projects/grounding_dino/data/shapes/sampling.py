"""Random layouts of synthetic shapes scenes (what is drawn where), before any drawing."""

from typing import Sequence

import numpy as np

from .config import COLOR_RGB
from .drawing import mask_box, object_alpha, visible_coverage

__all__ = ["sample_scene", "MIN_VISIBLE"]

# Circumradius of each size class, as a fraction of the image side (gap of 1.6x between them).
SIZE_RADIUS = {"small": (0.055, 0.075), "large": (0.12, 0.16)}
COLOR_JITTER = 12  # per channel, uniform +-
MIN_VISIBLE = 0.7  # every shape keeps at least this fraction of its area visible
MAX_ROTATION = 20.0  # degrees


def _sample_background(rng: np.random.Generator) -> dict:
    """Low-saturation backgrounds, so that every named colour stays distinct from them."""

    def tinted_grey(level):
        return np.clip(level + rng.uniform(-18, 18, size=3), 0, 255).round().tolist()

    level = rng.uniform(70, 205)
    colors = [tinted_grey(level)]
    kind = "gradient" if rng.random() < 0.6 else "solid"
    if kind == "gradient":
        colors.append(tinted_grey(np.clip(level + rng.uniform(-70, 70), 50, 225)))
    noisy = rng.random() < 0.5
    return {
        "kind": kind,
        "colors": colors,
        "angle": float(rng.uniform(0, 360)),
        "noise_sigma": float(rng.uniform(2, 6)) if noisy else 0.0,
        "noise_seed": int(rng.integers(2**31)),
    }


def _sample_object(rng: np.random.Generator, pair: str, size: int) -> dict:
    """A shape of ``pair`` with a random size class, pose and colour jitter, inside the image."""
    color, shape = pair.split(" ")
    size_class = "large" if rng.random() < 0.5 else "small"
    lo, hi = SIZE_RADIUS[size_class]
    radius = float(rng.uniform(lo, hi) * size)
    angle = 0.0 if shape == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    margin = radius + 2.0
    center = [float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))]
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    rgb = np.clip(np.asarray(COLOR_RGB[color]) + jitter, 0, 255).tolist()
    return {
        "color": color,
        "shape": shape,
        "size": size_class,
        "rgb": [int(v) for v in rgb],
        "center": center,
        "radius": radius,
        "angle": angle,
    }


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    pairs: Sequence[str],
    num_objects: int,
    distractor_pairs: Sequence[str] = (),
    distractor_prob: float = 0.0,
    max_tries: int = 40,
) -> dict:
    """
    Samples the layout of one image.

    Each object is placed at random so that it lies inside the image and every object below
    it keeps at least ``MIN_VISIBLE`` of its area visible; an object that cannot be placed in
    ``max_tries`` is dropped (the first object always fits).

    Args:
        rng: the image's own generator.
        image_size: side of the square image.
        pairs: "colour shape" names of annotated objects.
        num_objects: objects to try to place.
        distractor_pairs: pairs drawn but not annotated (``"annotated": False``).
        distractor_prob: chance that an object after the first is a distractor.

    Returns:
        scene dict with "height", "width", "background" and "objects"; each object has
        "color", "shape", "size", "rgb", "center", "radius", "angle", "annotated", "bbox"
        (tight XYWH_ABS box of its visible pixels) and "area" (visible pixel count).
    """
    background = _sample_background(rng)
    objects, alphas = [], []
    for k in range(num_objects):
        distractor = k > 0 and len(distractor_pairs) > 0 and rng.random() < distractor_prob
        pool = distractor_pairs if distractor else pairs
        pair = pool[int(rng.integers(len(pool)))]
        for _ in range(max_tries):
            obj = _sample_object(rng, pair, image_size)
            alpha = object_alpha(obj, image_size, image_size)
            coverage = visible_coverage(alphas + [alpha])
            if all(
                cov.sum() >= MIN_VISIBLE * a.sum() and (cov >= 0.5).any()
                for cov, a in zip(coverage, alphas + [alpha])
            ):
                obj["annotated"] = not distractor
                objects.append(obj)
                alphas.append(alpha)
                break
    for obj, cov in zip(objects, visible_coverage(alphas)):
        obj["bbox"] = mask_box(cov >= 0.5)
        obj["area"] = int((cov >= 0.5).sum())
    return {
        "height": image_size,
        "width": image_size,
        "background": background,
        "objects": objects,
    }
