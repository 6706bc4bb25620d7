"""Drawing of synthetic shapes scenes: anti-aliased shapes composited on a background."""

import math
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .config import SHAPES

__all__ = ["render_scene", "object_alpha", "visible_coverage", "mask_box"]


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices [K, 2] (x, y) of a shape inscribed in a circle, rotated by ``angle`` degrees."""
    if shape == "square":
        t = np.deg2rad(np.arange(4) * 90.0 + 45.0)
        r = np.full(4, radius)
    elif shape == "triangle":
        t = np.deg2rad(np.arange(3) * 120.0 - 90.0)
        r = np.full(3, radius)
    elif shape == "hexagon":
        t = np.deg2rad(np.arange(6) * 60.0)
        r = np.full(6, radius)
    elif shape == "star":
        t = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    elif shape == "cross":
        b = radius / math.sqrt(1.0 + 0.34**2)  # arm length: the arm corners touch the circle
        a = 0.34 * b  # half width of the arms
        xy = np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a]]
            + [[a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
        t = np.arctan2(xy[:, 1], xy[:, 0])
        r = np.hypot(xy[:, 0], xy[:, 1])
    else:
        raise ValueError(f"Cannot draw shape '{shape}', expected one of {list(SHAPES)}")
    t = t + np.deg2rad(angle)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def object_alpha(obj: dict, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32 [H, W]) of one shape, drawn with cv2."""
    canvas = np.zeros((height, width), np.uint8)
    cx, cy = obj["center"]
    if obj["shape"] == "circle":
        center = (int(round(cx * 16)), int(round(cy * 16)))
        cv2.circle(canvas, center, int(round(obj["radius"] * 16)), 255, -1, cv2.LINE_AA, 4)
    else:
        pts = _shape_polygon(obj["shape"], cx, cy, obj["radius"], obj["angle"])
        cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255.0


def visible_coverage(alphas: List[np.ndarray]) -> List[np.ndarray]:
    """Coverage of each shape after the shapes drawn later (on top) are composited."""
    out = []
    above = np.ones_like(alphas[0]) if alphas else None
    for alpha in reversed(alphas):
        out.append(alpha * above)
        above = above * (1.0 - alpha)
    return out[::-1]


def mask_box(mask: np.ndarray) -> Optional[List[float]]:
    """Tight XYWH_ABS box of a bool mask (pixel i spans [i, i+1]); None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


def _background(background: dict, height: int, width: int) -> np.ndarray:
    """Float32 [H, W, 3] RGB background (solid or linear gradient), without noise."""
    c0 = np.asarray(background["colors"][0], np.float32)
    if background["kind"] == "solid":
        return np.broadcast_to(c0, (height, width, 3)).copy()
    c1 = np.asarray(background["colors"][1], np.float32)
    theta = np.deg2rad(background["angle"])
    xs = (np.arange(width, dtype=np.float32) - width / 2) * np.float32(np.cos(theta))
    ys = (np.arange(height, dtype=np.float32) - height / 2) * np.float32(np.sin(theta))
    proj = ys[:, None] + xs[None, :]
    t = ((proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6))[..., None]
    return (c0 + (c1 - c0) * t).astype(np.float32)


def render_scene(scene: dict) -> Tuple[np.ndarray, List[np.ndarray]]:
    """
    Draws a scene (as stored in ``scenes.json``).

    Args:
        scene: dict with "height", "width", "background" and "objects" (each with "shape",
            "rgb", "center", "radius", "angle"), in drawing order (later on top).

    Returns:
        image: uint8 [H, W, 3] RGB.
        masks: one bool [H, W] per object, True where at least half of the pixel shows it.
    """
    height, width = scene["height"], scene["width"]
    image = _background(scene["background"], height, width)
    alphas = [object_alpha(obj, height, width) for obj in scene["objects"]]
    for obj, alpha in zip(scene["objects"], alphas):
        box = mask_box(alpha > 0)
        if box is None:
            continue
        x0, y0, w, h = (int(v) for v in box)
        crop = (slice(y0, y0 + h), slice(x0, x0 + w))  # composite only where the shape is
        a = alpha[crop][..., None]
        image[crop] += (np.asarray(obj["rgb"], np.float32) - image[crop]) * a
    sigma = scene["background"]["noise_sigma"]
    if sigma > 0:
        noise_rng = np.random.default_rng(scene["background"]["noise_seed"])
        image += sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    masks = [cov >= 0.5 for cov in visible_coverage(alphas)]
    return image, masks
