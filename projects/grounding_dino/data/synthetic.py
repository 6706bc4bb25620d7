"""
Synthetic "shapes" grounding datasets: CPU training and evaluation without downloads.

Each image shows 1-5 anti-aliased shapes (circle, square, triangle, star, cross, hexagon) in
named colours and two size classes (small, large) on a solid or gradient background with
light noise; later shapes may partly hide earlier ones. Categories are colour-shape pairs
("red circle"). A fixed set of pairs (by default 20%) is held out of training: no training
image draws them, so ``shapes_val_unseen`` measures compositional zero-shot detection.

Splits registered by :func:`register_shapes_datasets` (``prefix`` defaults to "shapes"):

==========================  =========================================  ===============
name                        dicts (see docs/interfaces.md)              evaluator_type
==========================  =========================================  ===============
``{prefix}_train``          detection, seen pairs                       "coco"
``{prefix}_val``            detection, seen pairs                       "coco"
``{prefix}_val_unseen``     detection, held-out pairs only              "coco"
``{prefix}_rec_train``      REC, on the train images                    "rec"
``{prefix}_rec_val``        REC, on the val images                      "rec"
==========================  =========================================  ===============

* ``thing_classes`` of the seen splits (train, val, rec_*) are the seen pairs; those of
  ``{prefix}_val_unseen`` are the held-out pairs only. Its images also hold seen-pair
  distractors that are drawn but not annotated, so a detector that keys on colour or shape
  alone pays with false positives.
* Detection splits are written as COCO json (category ids 1..K in ``thing_classes`` order)
  and loaded with detectron2's ``load_coco_json``; metadata carries ``json_file`` for
  ``COCOEvaluator``.
* REC records: ``caption`` is the expression ("the large red circle", "the leftmost square",
  "the green star below the circle"), ``task`` is "rec", and the single annotation's
  ``tokens_positive`` spans the whole caption. Each expression is checked to pick exactly one
  object of its image (:func:`resolve_expression`). The annotation also carries the target's
  ``category_id`` (its pair in ``thing_classes``) so that detectron2's class histogram works
  when REC and detection splits are trained together. ``image_id`` is unique per expression;
  expressions on the same image share ``file_name``.

Generation is deterministic in the seed (each image draws from its own generator seeded by
(seed, split, index)). Images are written once as PNG under ``root/<split>-<hash>/`` where
the hash covers every generation parameter; a complete folder is reused. ``root`` is the
argument, else ``$GROUNDING_DINO_SHAPES_DIR``, else "output/demo/shapes" under the working
directory. At the defaults (2000 + 200 + 200 images of 256 px) generation takes about 40 s
on 2 shared cores and writes about 150 MB.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

__all__ = [
    "COLOR_RGB",
    "SHAPES",
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "SHAPES_DIR_ENV",
    "ShapesConfig",
    "shape_pairs",
    "sample_scene",
    "render_scene",
    "resolve_expression",
    "make_expression",
    "generate_shapes_split",
    "load_shapes_scenes",
    "load_shapes_rec",
    "register_shapes_datasets",
]

logger = logging.getLogger(__name__)

# Bump when the drawing or sampling changes, so that old caches are not reused.
GENERATOR_VERSION = 1
SHAPES_DIR_ENV = "GROUNDING_DINO_SHAPES_DIR"
DEFAULT_SHAPES_DIR = os.path.join("output", "demo", "shapes")

COLOR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 85, 230),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 200),
    "orange": (250, 135, 15),
    "cyan": (30, 200, 225),
    "pink": (245, 115, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "cross")
# Circumradius of each size class, as a fraction of the image side (gap of 1.6x between them).
SIZE_RADIUS = {"small": (0.055, 0.075), "large": (0.12, 0.16)}
COLOR_JITTER = 12  # per channel, uniform +-
MIN_VISIBLE = 0.7  # every shape keeps at least this fraction of its area visible
MAX_ROTATION = 20.0  # degrees
SPATIAL_MARGIN = 0.06  # fraction of the image side that separates "left of", "leftmost", ...

SUPERLATIVES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("to the left of", "to the right of", "above", "below")

DETECTION_SPLITS = ("train", "val", "val_unseen")
REC_SPLITS = {"rec_train": "train", "rec_val": "val"}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """
    Generation parameters of the synthetic shapes datasets.

    Attributes:
        num_train, num_val, num_val_unseen: number of images per detection split.
        image_size: side of the square images in pixels (at least 64).
        seed: base seed; the same config gives the same images and dicts.
        colors: colour names (keys of ``COLOR_RGB``).
        shapes: shape names (members of ``SHAPES``).
        unseen_pairs: held-out "colour shape" names; None picks ``unseen_fraction`` of the
            pairs along wrapped diagonals of the colour x shape grid (see :func:`shape_pairs`).
        unseen_fraction: fraction of pairs held out when ``unseen_pairs`` is None.
        min_objects, max_objects: shapes per image (uniform).
        refs_per_image: referring expressions per train/val image (distinct targets).
    """

    num_train: int = 2000
    num_val: int = 200
    num_val_unseen: int = 200
    image_size: int = 256
    seed: int = 0
    colors: Tuple[str, ...] = DEFAULT_COLORS
    shapes: Tuple[str, ...] = DEFAULT_SHAPES
    unseen_pairs: Optional[Tuple[str, ...]] = None
    unseen_fraction: float = 0.2
    min_objects: int = 1
    max_objects: int = 5
    refs_per_image: int = 2

    def __post_init__(self):
        for field in ("num_train", "num_val", "num_val_unseen", "refs_per_image"):
            if int(getattr(self, field)) < 0:
                raise ValueError(f"ShapesConfig.{field} must be >= 0, got {getattr(self, field)}")
        if self.image_size < 64:
            raise ValueError(f"ShapesConfig.image_size must be >= 64 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                "ShapesConfig needs 1 <= min_objects <= max_objects <= 8, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        # Normalise sequences to tuples so that the config hashes and compares by value.
        object.__setattr__(self, "colors", tuple(self.colors))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.unseen_pairs is not None:
            object.__setattr__(self, "unseen_pairs", tuple(self.unseen_pairs))
        self.pairs()  # validates colours, shapes and the held-out pairs

    def pairs(self) -> Tuple[List[str], List[str]]:
        """Returns (seen pairs, held-out pairs) as "colour shape" names."""
        return shape_pairs(self.colors, self.shapes, self.unseen_pairs, self.unseen_fraction)

    def split_key(self, split: str) -> str:
        """Hash of every parameter that changes the images or dicts of ``split``."""
        if split not in DETECTION_SPLITS:
            raise ValueError(f"Unknown shapes split '{split}', expected one of {DETECTION_SPLITS}")
        params = dataclasses.asdict(self)
        params["num_images"] = self.num_images(split)
        for name in ("num_train", "num_val", "num_val_unseen"):
            params.pop(name)
        params["unseen_pairs"] = self.pairs()[1]
        params.update(split=split, version=GENERATOR_VERSION)
        text = json.dumps(params, sort_keys=True)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "val_unseen": self.num_val_unseen}[
            split
        ]


def shape_pairs(
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    unseen_pairs: Optional[Sequence[str]] = None,
    unseen_fraction: float = 0.2,
) -> Tuple[List[str], List[str]]:
    """
    Splits the colour x shape pairs into seen and held-out ones.

    The default held-out set takes ``round(unseen_fraction * C * S)`` pairs
    ``(colors[k % C], shapes[(k + k // C) % S])`` for k = 0, 1, ... (skipping repeats), so
    each colour and each shape still has seen pairs. With the default 6 colours and 5 shapes:
    red circle, green square, blue triangle, yellow star, purple cross, orange circle.

    Returns:
        (seen, unseen): lists of "colour shape" names in colour-major order.
    """
    for color in colors:
        if color not in COLOR_RGB:
            raise ValueError(f"Unknown shapes colour '{color}', expected one of {list(COLOR_RGB)}")
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"Unknown shape '{shape}', expected one of {list(SHAPES)}")
    if len(set(colors)) != len(colors) or len(set(shapes)) != len(shapes) or not colors:
        raise ValueError(f"Shapes colours {colors} and shapes {shapes} must be non-empty, unique")
    all_pairs = [f"{c} {s}" for c in colors for s in shapes]
    if unseen_pairs is None:
        if not 0.0 <= unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        n_unseen = int(round(unseen_fraction * len(all_pairs)))
        chosen: List[str] = []
        k = 0
        while len(chosen) < n_unseen:
            pair = f"{colors[k % len(colors)]} {shapes[(k + k // len(colors)) % len(shapes)]}"
            if pair not in chosen:
                chosen.append(pair)
            k += 1
        unseen_set = set(chosen)
    else:
        unseen_set = set(unseen_pairs)
        unknown = sorted(unseen_set - set(all_pairs))
        if unknown:
            raise ValueError(f"unseen_pairs {unknown} are not colour-shape pairs of {all_pairs}")
    seen = [p for p in all_pairs if p not in unseen_set]
    unseen = [p for p in all_pairs if p in unseen_set]
    if not seen:
        raise ValueError("Every colour-shape pair is held out; nothing is left to train on")
    return seen, unseen


# ---------------------------------------------------------------------------------------------
# Drawing


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


def _object_alpha(obj: dict, height: int, width: int) -> np.ndarray:
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


def _visible_coverage(alphas: List[np.ndarray]) -> List[np.ndarray]:
    """Coverage of each shape after the shapes drawn later (on top) are composited."""
    out = []
    above = np.ones_like(alphas[0]) if alphas else None
    for alpha in reversed(alphas):
        out.append(alpha * above)
        above = above * (1.0 - alpha)
    return out[::-1]


def _mask_box(mask: np.ndarray) -> Optional[List[float]]:
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
    alphas = [_object_alpha(obj, height, width) for obj in scene["objects"]]
    for obj, alpha in zip(scene["objects"], alphas):
        box = _mask_box(alpha > 0)
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
    masks = [cov >= 0.5 for cov in _visible_coverage(alphas)]
    return image, masks


# ---------------------------------------------------------------------------------------------
# Scene sampling


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
            alpha = _object_alpha(obj, image_size, image_size)
            coverage = _visible_coverage(alphas + [alpha])
            if all(
                cov.sum() >= MIN_VISIBLE * a.sum() and (cov >= 0.5).any()
                for cov, a in zip(coverage, alphas + [alpha])
            ):
                obj["annotated"] = not distractor
                objects.append(obj)
                alphas.append(alpha)
                break
    for obj, cov in zip(objects, _visible_coverage(alphas)):
        obj["bbox"] = _mask_box(cov >= 0.5)
        obj["area"] = int((cov >= 0.5).sum())
    return {
        "height": image_size,
        "width": image_size,
        "background": background,
        "objects": objects,
    }


# ---------------------------------------------------------------------------------------------
# Referring expressions


@functools.lru_cache(maxsize=1)
def _expression_regex() -> "re.Pattern":
    colors = "|".join(COLOR_RGB)
    shapes = "|".join(SHAPES + ("shape",))
    noun_phrase = r"(?:(small|large) )?(?:({}) )?({})".format(colors, shapes)
    superlatives = "|".join(SUPERLATIVES)
    relations = "|".join(RELATIONS)
    return re.compile(
        r"^the (?:({}) )?{}(?: ({}) the {})?$".format(
            superlatives, noun_phrase, relations, noun_phrase
        )
    )


def _centers(objects: Sequence[dict]) -> np.ndarray:
    boxes = np.asarray([o["bbox"] for o in objects], np.float64).reshape(-1, 4)
    return boxes[:, :2] + boxes[:, 2:] / 2


def _match_np(objects: Sequence[dict], size, color, shape) -> List[int]:
    return [
        i
        for i, o in enumerate(objects)
        if (size is None or o["size"] == size)
        and (color is None or o["color"] == color)
        and (shape in (None, "shape") or o["shape"] == shape)
    ]


def _relation_holds(offset: np.ndarray, relation: str, margin: float, strict: bool) -> bool:
    """Whether an object at ``offset`` (dx, dy; y down) from its reference fits ``relation``."""
    dx, dy = offset
    along, across = {
        "to the left of": (-dx, dy),
        "to the right of": (dx, dy),
        "above": (-dy, dx),
        "below": (dy, dx),
    }[relation]
    if strict:
        return along >= margin and along >= abs(across)
    return along > 0 and along >= 0.5 * abs(across)


def _superlative_key(centers: np.ndarray, superlative: str) -> np.ndarray:
    return {
        "leftmost": centers[:, 0],
        "rightmost": -centers[:, 0],
        "topmost": centers[:, 1],
        "bottommost": -centers[:, 1],
    }[superlative]


def _resolve_query(query: tuple, objects: Sequence[dict], image_size: int, strict: bool):
    superlative, np1, relation, np2 = query
    margin = SPATIAL_MARGIN * image_size
    centers = _centers(objects)
    candidates = _match_np(objects, *np1)
    if relation is not None:
        refs = _match_np(objects, *np2)
        if strict and len(refs) != 1:
            return []
        candidates = [
            i
            for i in candidates
            if any(
                i != r and _relation_holds(centers[i] - centers[r], relation, margin, strict)
                for r in refs
            )
        ]
    if superlative is not None and candidates:
        key = _superlative_key(centers[candidates], superlative)
        near = [c for c, k in zip(candidates, key) if k - key.min() < margin]
        candidates = near if not strict else (near if len(near) == 1 else [])
    return candidates


def _parse_expression(expression: str) -> tuple:
    match = _expression_regex().match(expression)
    if match is None:
        raise ValueError(
            f"Cannot parse referring expression '{expression}': expected 'the [superlative] "
            "[small|large] [colour] shape-or-'shape' [relation the [small|large] [colour] shape]'"
        )
    g = match.groups()
    np2 = (g[5], g[6], g[7]) if g[4] is not None else None
    return g[0], (g[1], g[2], g[3]), g[4], np2


def resolve_expression(
    expression: str, objects: Sequence[dict], image_size: int, strict: bool = False
) -> List[int]:
    """
    Indices of the objects a synthetic referring expression may refer to.

    Grammar: ``the [leftmost|rightmost|topmost|bottommost] [small|large] [colour] NOUN
    [(to the left of|to the right of|above|below) the [small|large] [colour] NOUN]`` where
    NOUN is a shape name or "shape" (any shape). Positions are box centres; ``SPATIAL_MARGIN``
    of the image side separates "clearly" from "maybe".

    Args:
        expression: the expression.
        objects: the scene's objects (dicts with "color", "shape", "size", "bbox").
        image_size: side of the image in pixels.
        strict: False returns every object a reader might take it to mean (relations
            that hold at least loosely, objects within the margin of the extreme); True
            returns the objects it clearly means (the reference object must be unique).

    Returns:
        Indices into ``objects``. The expression picks object t unambiguously exactly when
        both the loose and the strict results are ``[t]``.
    """
    return _resolve_query(_parse_expression(expression), objects, image_size, strict)


def _format_np(np_: tuple) -> str:
    return " ".join(w for w in (np_[0], np_[1], np_[2] or "shape") if w is not None)


def _format_query(query: tuple) -> str:
    superlative, np1, relation, np2 = query
    text = "the " + (f"{superlative} " if superlative else "") + _format_np(np1)
    if relation is not None:
        text += f" {relation} the {_format_np(np2)}"
    return text


def _noun_phrases(obj: dict) -> List[tuple]:
    """The 7 descriptions (size, colour, shape; None where omitted) that fit ``obj``."""
    out = []
    for use_size in (False, True):
        for use_color in (False, True):
            for use_shape in (False, True):
                if use_size or use_color or use_shape:
                    out.append(
                        (
                            obj["size"] if use_size else None,
                            obj["color"] if use_color else None,
                            obj["shape"] if use_shape else None,
                        )
                    )
    return out


def make_expression(
    objects: Sequence[dict], target: int, image_size: int, rng: np.random.Generator
) -> Optional[str]:
    """
    A referring expression that picks ``objects[target]`` and nothing else.

    Candidates of three kinds are built from the scene: attributes ("the large red circle",
    "the blue shape"), superlatives over two or more look-alikes ("the leftmost square"), and
    relations to a uniquely described object ("the green star below the circle"). One kind is
    drawn (weights 0.5 / 0.25 / 0.25 among the kinds that have candidates), then one
    candidate; the chosen text is parsed back and checked with :func:`resolve_expression`.

    Returns:
        The expression, or None if no candidate is unambiguous (identical twins side by side).
    """

    def unique(query):
        return _resolve_query(query, objects, image_size, False) == [target] and _resolve_query(
            query, objects, image_size, True
        ) == [target]

    kinds: Dict[str, List[tuple]] = {"attribute": [], "superlative": [], "relation": []}
    target_nps = _noun_phrases(objects[target])
    for np1 in target_nps:
        query = (None, np1, None, None)
        if unique(query):
            kinds["attribute"].append(query)
        elif len(_match_np(objects, *np1)) >= 2:
            for superlative in SUPERLATIVES:
                query = (superlative, np1, None, None)
                if unique(query):
                    kinds["superlative"].append(query)
    for ref, obj in enumerate(objects):
        if ref == target:
            continue
        ref_nps = [np2 for np2 in _noun_phrases(obj) if _match_np(objects, *np2) == [ref]]
        if not ref_nps:
            continue
        np2 = min(ref_nps, key=lambda p: sum(w is not None for w in p))
        for np1 in target_nps:
            if len(_match_np(objects, *np1)) < 2 and kinds["attribute"]:
                continue  # keep relations for targets that need them, mostly
            for relation in RELATIONS:
                query = (None, np1, relation, np2)
                if unique(query):
                    kinds["relation"].append(query)
    weights = {"attribute": 0.5, "superlative": 0.25, "relation": 0.25}
    available = [k for k in kinds if kinds[k]]
    if not available:
        return None
    p = np.asarray([weights[k] for k in available])
    kind = available[int(rng.choice(len(available), p=p / p.sum()))]
    query = kinds[kind][int(rng.integers(len(kinds[kind])))]
    expression = _format_query(query)
    if resolve_expression(expression, objects, image_size) != [target] or resolve_expression(
        expression, objects, image_size, strict=True
    ) != [target]:
        raise AssertionError(f"Generated expression '{expression}' does not pick object {target}")
    return expression


# ---------------------------------------------------------------------------------------------
# Splits on disk

_SPLIT_CODES = {"train": 0, "val": 1, "val_unseen": 2}


def _generate_image(config: ShapesConfig, split: str, index: int) -> dict:
    """Scene (with referring expressions for train/val) of image ``index`` of ``split``."""
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    seen, unseen = config.pairs()
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    if split == "val_unseen":
        if not unseen:
            raise ValueError("shapes_val_unseen needs held-out pairs; unseen_fraction is 0")
        scene = sample_scene(rng, config.image_size, unseen, num_objects, seen, 0.4)
    else:
        scene = sample_scene(rng, config.image_size, seen, num_objects)
    refs = []
    if split != "val_unseen":
        objects = scene["objects"]
        for target in rng.permutation(len(objects)).tolist():
            if len(refs) >= config.refs_per_image:
                break
            expression = make_expression(objects, target, config.image_size, rng)
            if expression is not None:
                refs.append({"expression": expression, "target": target})
    scene.update(id=index + 1, file_name=f"{index:06d}.png", refs=refs)
    return scene


def _coco_json(scenes: List[dict], classes: List[str]) -> dict:
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for scene in scenes:
        images.append(
            {k: scene[k] for k in ("id", "file_name", "height", "width")},
        )
        for obj in scene["objects"]:
            if not obj["annotated"]:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene["id"],
                    "category_id": cat_ids[f"{obj['color']} {obj['shape']}"],
                    "bbox": obj["bbox"],
                    "area": float(obj["area"]),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i, "name": name, "supercategory": name.split(" ")[1]} for name, i in cat_ids.items()
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _split_classes(config: ShapesConfig, split: str) -> List[str]:
    seen, unseen = config.pairs()
    return unseen if split == "val_unseen" else seen


def _resolve_root(root: Optional[str]) -> str:
    return os.path.abspath(root or os.environ.get(SHAPES_DIR_ENV) or DEFAULT_SHAPES_DIR)


def _split_dir(config: ShapesConfig, split: str, root: Optional[str]) -> str:
    return os.path.join(_resolve_root(root), f"{split}-{config.split_key(split)}")


def generate_shapes_split(config: ShapesConfig, split: str, root: Optional[str] = None) -> str:
    """
    Writes one detection split (PNG images, ``scenes.json``, COCO ``coco.json``) unless it is
    already complete, and returns its folder ``root/<split>-<hash>``.

    A split is complete when its ``coco.json`` exists (written last). Files go to a temporary
    folder first that is renamed into place, so an interrupted run leaves no half split.

    Args:
        config: generation parameters.
        split: "train", "val" or "val_unseen".
        root: cache folder; None uses ``$GROUNDING_DINO_SHAPES_DIR`` or "output/demo/shapes"
            relative to the working directory.
    """
    out_dir = _split_dir(config, split, root)
    if os.path.isfile(os.path.join(out_dir, "coco.json")):
        return out_dir
    num = config.num_images(split)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(os.path.join(tmp_dir, "images"))
    logger.info(f"Generating {num} synthetic shapes images for split '{split}' in {out_dir} ...")
    start, scenes = time.perf_counter(), []
    for index in range(num):
        scene = _generate_image(config, split, index)
        image, _ = render_scene(scene)
        path = os.path.join(tmp_dir, "images", scene["file_name"])
        if not cv2.imwrite(path, image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"Could not write synthetic image {path}")
        scenes.append(scene)
        if (index + 1) % max(1, num // 10) == 0 or index + 1 == num:
            elapsed = time.perf_counter() - start
            logger.info(f"  shapes {split}: {index + 1}/{num} images ({elapsed:.1f} s)")
    meta = {"config": dataclasses.asdict(config), "split": split}
    meta["classes"] = _split_classes(config, split)
    with open(os.path.join(tmp_dir, "scenes.json"), "w") as f:
        json.dump({**meta, "images": scenes}, f)
    with open(os.path.join(tmp_dir, "coco.json"), "w") as f:
        json.dump(_coco_json(scenes, meta["classes"]), f)
    if os.path.isdir(out_dir):  # an incomplete folder from an interrupted older run
        shutil.rmtree(out_dir)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:  # another process finished the same split first
        if not os.path.isfile(os.path.join(out_dir, "coco.json")):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def load_shapes_scenes(split_dir: str) -> dict:
    """Reads ``scenes.json`` of a generated split (the layouts and expressions of its images)."""
    path = os.path.join(split_dir, "scenes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No synthetic shapes split at {split_dir} (missing {path})")
    with open(path) as f:
        return json.load(f)


def load_shapes_rec(split_dir: str, classes: Optional[Sequence[str]] = None) -> List[dict]:
    """
    REC dataset dicts (docs/interfaces.md grounding format, ``"task": "rec"``) of a split.

    Args:
        split_dir: folder written by :func:`generate_shapes_split` ("train" or "val").
        classes: thing_classes used for the informational ``category_id``; defaults to the
            split's own classes.
    """
    data = load_shapes_scenes(split_dir)
    cat_index = {name: i for i, name in enumerate(classes or data["classes"])}
    dicts = []
    for scene in data["images"]:
        for ref in scene["refs"]:
            obj = scene["objects"][ref["target"]]
            caption = ref["expression"]
            annotation = {
                "bbox": list(obj["bbox"]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "tokens_positive": [[0, len(caption)]],
                "phrase_id": 0,
                "category_id": cat_index[f"{obj['color']} {obj['shape']}"],
            }
            dicts.append(
                {
                    "file_name": os.path.join(split_dir, "images", scene["file_name"]),
                    "height": scene["height"],
                    "width": scene["width"],
                    "image_id": len(dicts) + 1,
                    "caption": caption,
                    "task": "rec",
                    "annotations": [annotation],
                }
            )
    return dicts


def _load_detection(config: ShapesConfig, split: str, root: str, name: str) -> List[dict]:
    split_dir = generate_shapes_split(config, split, root)
    return load_coco_json(
        os.path.join(split_dir, "coco.json"), os.path.join(split_dir, "images"), name
    )


def _load_rec(config: ShapesConfig, split: str, root: str) -> List[dict]:
    return load_shapes_rec(generate_shapes_split(config, split, root))


def register_shapes_datasets(
    root: Optional[str] = None,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 256,
    *,
    prefix: str = "shapes",
    generate: bool = True,
    **config_kwargs,
) -> Dict[str, str]:
    """
    Registers the synthetic shapes splits in ``DatasetCatalog`` and ``MetadataCatalog``.

    Calling it again replaces earlier registrations of the same names (so it is idempotent,
    and a new root or size takes effect).

    Args:
        root: cache folder; None uses ``$GROUNDING_DINO_SHAPES_DIR`` or "output/demo/shapes"
            relative to the working directory.
        num_train, num_val: images in the train and val splits (``num_val_unseen`` defaults to
            ``num_val``).
        image_size: side of the square images in pixels.
        prefix: dataset name prefix.
        generate: write the images now (so ``json_file`` exists for ``COCOEvaluator``);
            False defers it to the first ``DatasetCatalog.get``.
        config_kwargs: other :class:`ShapesConfig` fields (seed, colors, shapes,
            unseen_pairs, unseen_fraction, min_objects, max_objects, refs_per_image,
            num_val_unseen).

    Returns:
        dict from each registered dataset name to its split folder.
    """
    config_kwargs.setdefault("num_val_unseen", num_val)
    config = ShapesConfig(
        num_train=num_train, num_val=num_val, image_size=image_size, **config_kwargs
    )
    root = _resolve_root(root)
    seen, unseen = config.pairs()
    splits = list(DETECTION_SPLITS if unseen else DETECTION_SPLITS[:2]) + list(REC_SPLITS)
    registered = {}
    for split in splits:
        name = f"{prefix}_{split}"
        base = REC_SPLITS.get(split, split)
        split_dir = _split_dir(config, base, root)
        if generate:
            generate_shapes_split(config, base, root)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        classes = _split_classes(config, base)
        meta = dict(
            thing_classes=list(classes),
            image_root=os.path.join(split_dir, "images"),
            shapes_split_dir=split_dir,
            shapes_seen_classes=list(seen),
            shapes_unseen_classes=list(unseen),
        )
        if split in REC_SPLITS:
            DatasetCatalog.register(name, functools.partial(_load_rec, config, base, root))
            meta.update(evaluator_type="rec")
        else:
            DatasetCatalog.register(
                name, functools.partial(_load_detection, config, split, root, name)
            )
            meta.update(
                evaluator_type="coco",
                json_file=os.path.join(split_dir, "coco.json"),
                thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(classes))},
            )
        MetadataCatalog.get(name).set(**meta)
        registered[name] = split_dir
    return registered
