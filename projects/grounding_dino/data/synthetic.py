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
``{prefix}_grounding_train``  grounding: the REC expressions of an     (training only)
                            image joined into one caption
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
* Grounding records (:func:`load_shapes_grounding`): one expression for every object of an
  image that has one, joined with " . " into one caption, each expression one phrase
  (``tokens_positive``, ``phrase_id``); spatial expressions are drawn as often as attribute
  ones. Two records per train image (``grounding_variants``), each with its own draw.

The parts live in ``grounding_dino.data.shapes`` (parameters, drawing, layouts, expressions,
splits on disk); this module registers the datasets and re-exports the public names.
``tools/generate_shapes.py`` writes the splits ahead of time.

Generation is deterministic in the seed (each image draws from its own generator seeded by
(seed, split, index)). Images are written once as PNG under ``root/<split>-<hash>/`` where
the hash covers every generation parameter; a complete folder is reused. ``root`` is the
argument, else ``$GROUNDING_DINO_SHAPES_DIR``, else "output/demo/shapes" under the working
directory. At the defaults (2000 + 200 + 200 images of 256 px) generation takes about 40 s
on 2 shared cores and writes about 150 MB.
"""

import functools
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes.config import (
    COLOR_RGB,
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    DETECTION_SPLITS,
    SHAPES,
    ShapesConfig,
    shape_pairs,
)
from .shapes.drawing import render_scene
from .shapes.expressions import (
    RELATIONS,
    SPATIAL_MARGIN,
    SUPERLATIVES,
    make_expression,
    resolve_expression,
)
from .shapes.sampling import sample_scene
from .shapes.splits import (
    SHAPES_DIR_ENV,
    generate_shapes_split,
    load_shapes_grounding,
    load_shapes_rec,
    load_shapes_scenes,
    resolve_root,
    split_classes,
    split_folder,
)

__all__ = [
    "COLOR_RGB",
    "SHAPES",
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "DETECTION_SPLITS",
    "REC_SPLITS",
    "RELATIONS",
    "SHAPES_DIR_ENV",
    "SPATIAL_MARGIN",
    "SUPERLATIVES",
    "ShapesConfig",
    "shape_pairs",
    "sample_scene",
    "render_scene",
    "resolve_expression",
    "make_expression",
    "generate_shapes_split",
    "load_shapes_scenes",
    "load_shapes_rec",
    "load_shapes_grounding",
    "register_shapes_datasets",
]

# REC dataset -> the detection split whose images (and expressions) it uses.
REC_SPLITS = {"rec_train": "train", "rec_val": "val"}
# Grounding dataset -> the detection split whose images it uses.
GROUNDING_SPLITS = {"grounding_train": "train"}
# Every dataset on another split's images -> that split.
_IMAGE_SPLITS = {**REC_SPLITS, **GROUNDING_SPLITS}


def _load_detection(config: ShapesConfig, split: str, root: str, name: str) -> List[dict]:
    folder = generate_shapes_split(config, split, root)
    return load_coco_json(os.path.join(folder, "coco.json"), os.path.join(folder, "images"), name)


def _load_rec(config: ShapesConfig, split: str, root: str) -> List[dict]:
    return load_shapes_rec(generate_shapes_split(config, split, root))


def _load_grounding(config: ShapesConfig, split: str, root: str, variants: int) -> List[dict]:
    folder = generate_shapes_split(config, split, root)
    return load_shapes_grounding(folder, variants=variants, seed=config.seed)


def register_shapes_datasets(
    root: Optional[str] = None,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 256,
    *,
    prefix: str = "shapes",
    generate: bool = True,
    grounding_variants: int = 2,
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
        generate: write the images (and the grounding captions) now, so that ``json_file``
            exists for ``COCOEvaluator``; False defers it to the first ``DatasetCatalog.get``.
        grounding_variants: records per train image in ``{prefix}_grounding_train``.
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
    root = resolve_root(root)
    seen, unseen = config.pairs()
    splits = list(DETECTION_SPLITS if unseen else DETECTION_SPLITS[:2]) + list(REC_SPLITS)
    splits += list(GROUNDING_SPLITS)
    registered = {}
    for split in splits:
        name = f"{prefix}_{split}"
        base = _IMAGE_SPLITS.get(split, split)
        split_dir = split_folder(config, base, root)
        if generate:
            generate_shapes_split(config, base, root)
            if split in GROUNDING_SPLITS:  # draws and caches the merged captions
                load_shapes_grounding(split_dir, variants=grounding_variants, seed=config.seed)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        classes = split_classes(config, base)
        meta = dict(
            thing_classes=list(classes),
            image_root=os.path.join(split_dir, "images"),
            shapes_split_dir=split_dir,
            shapes_seen_classes=list(seen),
            shapes_unseen_classes=list(unseen),
            # Loading draws a missing split: its files need not exist before (the train
            # driver's path check skips it).
            generated_on_load=True,
        )
        if split in REC_SPLITS:
            DatasetCatalog.register(name, functools.partial(_load_rec, config, base, root))
            meta.update(evaluator_type="rec")
        elif split in GROUNDING_SPLITS:
            DatasetCatalog.register(
                name,
                functools.partial(_load_grounding, config, base, root, grounding_variants),
            )
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
