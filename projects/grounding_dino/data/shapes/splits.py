"""
Synthetic shapes splits on disk: PNG images, ``scenes.json`` (layouts and expressions) and
COCO ``coco.json`` (boxes, and each object's exact visible mask as an RLE ``segmentation``)
under ``root/<split>-<hash>/``, and their dataset dicts.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode

from ...io.atomic import atomic_file, temporary_directory
from .config import ShapesConfig
from .drawing import render_scene
from .expressions import make_expression
from .sampling import sample_scene

__all__ = [
    "SHAPES_DIR_ENV",
    "DEFAULT_SHAPES_DIR",
    "generate_scene",
    "generate_shapes_split",
    "load_shapes_scenes",
    "load_shapes_rec",
    "load_shapes_grounding",
    "mask_rle",
    "GROUNDING_KIND_WEIGHTS",
    "resolve_root",
    "split_classes",
    "split_folder",
]

logger = logging.getLogger(__name__)

SHAPES_DIR_ENV = "GROUNDING_DINO_SHAPES_DIR"
DEFAULT_SHAPES_DIR = os.path.join("output", "demo", "shapes")
_SPLIT_CODES = {"train": 0, "val": 1, "val_unseen": 2}
# Seed stream of the expressions of load_shapes_grounding (apart from the scenes' own).
_GROUNDING_CODE = 3
# The merged grounding captions draw spatial expressions as often as attribute ones.
GROUNDING_KIND_WEIGHTS = {"attribute": 1.0, "superlative": 1.0, "relation": 1.0}


def _class_of(obj: dict) -> str:
    """The class name of a scene object: its colour-shape pair ("red circle")."""
    return f"{obj['color']} {obj['shape']}"


def generate_scene(config: ShapesConfig, split: str, index: int) -> dict:
    """
    Scene (with referring expressions for train/val) of image ``index`` of ``split``; it
    depends only on ``config.seed``, the split and the index (its own generator).
    """
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


def mask_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a bool [H, W] mask, ``counts`` as a str (json-able)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_json(scenes: List[dict], classes: List[str], masks: List[List[np.ndarray]]) -> dict:
    """COCO json of a split; ``masks[i][k]`` is the visible mask of object k of scene i, written
    as the annotation's ``segmentation`` (RLE; ``area`` is its pixel count)."""
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for scene, scene_masks in zip(scenes, masks):
        images.append(
            {k: scene[k] for k in ("id", "file_name", "height", "width")},
        )
        for obj, mask in zip(scene["objects"], scene_masks):
            if not obj["annotated"]:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene["id"],
                    "category_id": cat_ids[_class_of(obj)],
                    "bbox": obj["bbox"],
                    "area": float(obj["area"]),
                    "segmentation": mask_rle(mask),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i, "name": name, "supercategory": name.split(" ")[1]} for name, i in cat_ids.items()
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def split_classes(config: ShapesConfig, split: str) -> List[str]:
    """The ``thing_classes`` of a detection split: the held-out pairs for "val_unseen"."""
    seen, unseen = config.pairs()
    return unseen if split == "val_unseen" else seen


def resolve_root(root: Optional[str]) -> str:
    """The cache folder: ``root``, else ``$GROUNDING_DINO_SHAPES_DIR``, else output/demo/shapes."""
    return os.path.abspath(root or os.environ.get(SHAPES_DIR_ENV) or DEFAULT_SHAPES_DIR)


def split_folder(config: ShapesConfig, split: str, root: Optional[str]) -> str:
    """The folder ``<root>/<split>-<hash of the parameters>`` of one detection split."""
    return os.path.join(resolve_root(root), f"{split}-{config.split_key(split)}")


def _render_split(config: ShapesConfig, split: str, tmp_dir: str, out_dir: str) -> None:
    """Draws a split's images into ``tmp_dir/images`` and writes its scenes.json and
    coco.json (``tmp_dir`` becomes ``out_dir`` when complete)."""
    num = config.num_images(split)
    os.makedirs(os.path.join(tmp_dir, "images"))
    logger.info(f"Generating {num} synthetic shapes images for split '{split}' in {out_dir} ...")
    start, scenes, masks = time.perf_counter(), [], []
    for index in range(num):
        scene = generate_scene(config, split, index)
        image, scene_masks = render_scene(scene)
        masks.append(scene_masks)
        path = os.path.join(tmp_dir, "images", scene["file_name"])
        if not cv2.imwrite(path, image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"Could not write synthetic image {path}")
        scenes.append(scene)
        if (index + 1) % max(1, num // 10) == 0 or index + 1 == num:
            elapsed = time.perf_counter() - start
            logger.info(f"  shapes {split}: {index + 1}/{num} images ({elapsed:.1f} s)")
    meta = {"config": dataclasses.asdict(config), "split": split}
    meta["classes"] = split_classes(config, split)
    with open(os.path.join(tmp_dir, "scenes.json"), "w") as f:
        json.dump({**meta, "images": scenes}, f)
    with open(os.path.join(tmp_dir, "coco.json"), "w") as f:
        json.dump(_coco_json(scenes, meta["classes"], masks), f)


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
    out_dir = split_folder(config, split, root)
    if os.path.isfile(os.path.join(out_dir, "coco.json")):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = temporary_directory(out_dir)
    try:
        _render_split(config, split, tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
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
                "category_id": cat_index[_class_of(obj)],
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


def load_shapes_grounding(
    split_dir: str,
    classes: Optional[Sequence[str]] = None,
    variants: int = 2,
    seed: int = 0,
) -> List[dict]:
    """
    Grounding dataset dicts (docs/interfaces.md, no ``"task"``) of a split: each record holds
    one referring expression for every object of its image that has one, joined into one
    caption with " . " ("the leftmost square . the red circle above the blue star . the small
    shape"). The sub-sentence masks keep the expressions apart in the text encoder, so one
    record teaches what several REC records teach, for one pass over the image. Expressions are
    drawn with :data:`GROUNDING_KIND_WEIGHTS` and checked like the REC splits' (each picks
    exactly one object); objects no expression names stay unannotated (negatives).

    Args:
        split_dir: folder written by :func:`generate_shapes_split` (normally "train").
        classes: thing_classes for the informational ``category_id``; defaults to the split's.
        variants: records per image, each with its own draw of expressions and order.
        seed: seed of the draws (with the image index and the variant).

    The records are cached as ``grounding-<variants>x-seed<seed>.json`` in ``split_dir`` (the
    expressions take seconds to draw and check; every training process loads them).
    """
    if variants < 1:
        raise ValueError(f"load_shapes_grounding: variants must be >= 1, got {variants}")
    cache = os.path.join(split_dir, f"grounding-{variants}x-seed{seed}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            data = json.load(f)
    else:
        data = _grounding_records(split_dir, variants, seed)
        with atomic_file(cache) as f:  # a concurrent process writes the same content
            json.dump(data, f)
    cat_index = {name: i for i, name in enumerate(classes or data["classes"])}
    dicts = data["records"]
    for record in dicts:
        record["file_name"] = os.path.join(split_dir, "images", record["file_name"])
        for annotation in record["annotations"]:
            annotation["bbox_mode"] = BoxMode.XYWH_ABS
            annotation["category_id"] = cat_index[annotation.pop("category")]
    return dicts


def _grounding_records(split_dir: str, variants: int, seed: int) -> dict:
    """load_shapes_grounding's cache: {"classes", "records"}, records with bare file names and
    category names."""
    data = load_shapes_scenes(split_dir)
    dicts = []
    for scene in data["images"]:
        objects = scene["objects"]
        for variant in range(variants):
            rng = np.random.default_rng([seed, _GROUNDING_CODE, scene["id"], variant])
            phrases = []
            for target in rng.permutation(len(objects)).tolist():
                expression = make_expression(
                    objects, target, scene["width"], rng, GROUNDING_KIND_WEIGHTS
                )
                if expression is not None:
                    phrases.append((expression, target))
            if not phrases:
                continue
            caption, annotations = "", []
            for phrase_id, (expression, target) in enumerate(phrases):
                caption += " . " if caption else ""
                obj = objects[target]
                annotations.append(
                    {
                        "bbox": list(obj["bbox"]),
                        "tokens_positive": [[len(caption), len(caption) + len(expression)]],
                        "phrase_id": phrase_id,
                        "category": _class_of(obj),
                    }
                )
                caption += expression
            dicts.append(
                {
                    "file_name": scene["file_name"],
                    "height": scene["height"],
                    "width": scene["width"],
                    "image_id": len(dicts) + 1,
                    "caption": caption,
                    "annotations": annotations,
                }
            )
    return {"classes": data["classes"], "records": dicts}
