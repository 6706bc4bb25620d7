"""
Referring expressions of synthetic shapes scenes: a small grammar, its resolver and a
generator of expressions that pick exactly one object.
"""

import functools
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from .config import COLOR_RGB, SHAPES

__all__ = [
    "resolve_expression",
    "make_expression",
    "KIND_WEIGHTS",
    "SUPERLATIVES",
    "RELATIONS",
    "SPATIAL_MARGIN",
]

SPATIAL_MARGIN = 0.06  # fraction of the image side that separates "left of", "leftmost", ...
# Default chance of each kind of expression (see make_expression).
KIND_WEIGHTS = {"attribute": 0.5, "superlative": 0.25, "relation": 0.25}
SUPERLATIVES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("to the left of", "to the right of", "above", "below")


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
    objects: Sequence[dict],
    target: int,
    image_size: int,
    rng: np.random.Generator,
    kind_weights: Optional[Dict[str, float]] = None,
) -> Optional[str]:
    """
    A referring expression that picks ``objects[target]`` and nothing else.

    Candidates of three kinds are built from the scene: attributes ("the large red circle",
    "the blue shape"), superlatives over two or more look-alikes ("the leftmost square"), and
    relations to a uniquely described object ("the green star below the circle"). One kind is
    drawn (``kind_weights``, by default :data:`KIND_WEIGHTS`: 0.5 / 0.25 / 0.25, among the
    kinds that have candidates), then one candidate; the chosen text is parsed back and
    checked with :func:`resolve_expression`.

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
    weights = KIND_WEIGHTS if kind_weights is None else kind_weights
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
