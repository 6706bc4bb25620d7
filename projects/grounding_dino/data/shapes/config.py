"""Generation parameters of the synthetic shapes datasets: colours, shapes and their pairs."""

import dataclasses
import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "COLOR_RGB",
    "SHAPES",
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "DETECTION_SPLITS",
    "GENERATOR_VERSION",
    "ShapesConfig",
    "shape_pairs",
]

# Bump when the drawing, sampling or files change, so that old caches are not reused.
# 2: coco.json holds each object's mask as an RLE "segmentation".
GENERATOR_VERSION = 2

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

DETECTION_SPLITS = ("train", "val", "val_unseen")


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
