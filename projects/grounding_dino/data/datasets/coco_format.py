"""COCO-format detection folders (ODinW's datasets) and LVIS v1 minival, registered lazily."""

import functools
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json

from .checks import require_dir, require_file

__all__ = ["register_odinw", "register_lvis_minival", "get_thing_classes"]


def _load_coco_checked(json_file: str, image_root: str, name: str) -> List[Dict]:
    require_file(json_file, "Annotation file")
    require_dir(image_root, "Image folder")
    return load_coco_json(json_file, image_root, name)


def register_odinw(name: str, json_file: str, image_root: str) -> None:
    """
    Registers one ODinW dataset (or any COCO-format folder) lazily, as a detection dataset
    evaluated with COCO AP; ``thing_classes`` are set when it is loaded (see
    :func:`get_thing_classes`).
    """
    DatasetCatalog.register(
        name, functools.partial(_load_coco_checked, json_file, image_root, name)
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _load_lvis_checked(json_file: str, image_root: str, name: str) -> List[Dict]:
    require_file(json_file, "Annotation file")
    require_dir(image_root, "Image folder")
    return load_lvis_json(json_file, image_root, name)


def register_lvis_minival(name: str, json_file: str, image_root: str) -> None:
    """
    Registers LVIS v1 minival (the 5k-image subset of MDETR/GLIP) lazily. As detectron2's
    LVIS loader, image paths are ``image_root/<split folder of coco_url>/<file>``.
    """
    image_root = os.path.join(image_root, "")  # detectron2 appends the split folder to it
    DatasetCatalog.register(
        name, functools.partial(_load_lvis_checked, json_file, image_root, name)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        **get_lvis_instances_meta("lvis_v1"),
    )


def get_thing_classes(name: str) -> List[str]:
    """
    The category names of a registered detection dataset; loads the dataset when its
    metadata gets them at load time (COCO-format folders, ODVG with a label-map file).
    Usable in a LazyConfig: ``thing_classes=L(get_thing_classes)(name="odinw_x")``.
    """
    metadata = MetadataCatalog.get(name)
    if "thing_classes" not in metadata.as_dict():
        DatasetCatalog.get(name)
    if "thing_classes" not in metadata.as_dict():
        raise KeyError(f"Dataset {name!r} has no thing_classes: it is not a detection dataset")
    return list(metadata.thing_classes)
