"""COCO-format detection folders (ODinW's datasets) and LVIS v1 minival, registered lazily."""

import functools
import os
from typing import Dict, List, Optional, Sequence, Union

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


def _classes_of(name: str) -> Optional[List[str]]:
    """``thing_classes`` of a registered dataset, loading it when they are set at load time;
    None for grounding and REC datasets registered by task (MDETR files: no categories)."""
    metadata = MetadataCatalog.get(name)
    if "thing_classes" not in metadata.as_dict():
        if metadata.get("task") in ("rec", "grounding"):
            return None
        DatasetCatalog.get(name)
    if "thing_classes" not in metadata.as_dict():
        return None
    return list(metadata.thing_classes)


def get_thing_classes(name: Union[str, Sequence[str]]) -> List[str]:
    """
    The category names of a registered detection dataset; loads the dataset when its
    metadata gets them at load time (COCO-format folders, ODVG with a label-map file).
    Usable in a LazyConfig: ``thing_classes=L(get_thing_classes)(name="odinw_x")``, or as
    ``configs/common/data/coco_detection.py`` does, ``name="${...dataset.names}"`` so that the
    mapper's classes follow the dataset.

    Args:
        name: a dataset name, or several (the ``names`` of ``get_detection_dataset_dicts``):
            then the datasets with categories must all have the same ones (e.g. a detection
            split and a REC split of the same images); grounding and REC datasets without
            categories are skipped.

    Raises:
        KeyError: no dataset among ``name`` has thing_classes.
        ValueError: two of them have different thing_classes.
    """
    names = [name] if isinstance(name, str) else list(name)
    found = {n: c for n, c in ((n, _classes_of(n)) for n in names) if c is not None}
    if not found:
        raise KeyError(
            f"Dataset {name!r} has no thing_classes: it is not a detection dataset"
            if isinstance(name, str)
            else f"None of the datasets {names} has thing_classes: none is a detection dataset"
        )
    first, classes = next(iter(found.items()))
    for other, other_classes in found.items():
        if other_classes != classes:
            raise ValueError(
                f"Datasets {first!r} and {other!r} have different thing_classes ({classes} and "
                f"{other_classes}); a data loader's mapper prompts with one list: set "
                "dataloader.train.mapper.thing_classes explicitly"
            )
    return classes
