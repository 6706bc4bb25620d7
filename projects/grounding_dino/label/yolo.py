"""
The labeller's YOLO dataset (``python -m grounding_dino.label --format yolo``), written by
``supervision``'s dataset export (``sv.DetectionDataset(...).as_yolo(...)``): a detection
dataset (one ``class cx cy w h`` line per box), or with masks (``--sam``) a segmentation dataset
(polygon lines, one per connected part of a mask), in the layout Ultralytics trains on::

    <output>/images/<image file>     the labelled images, copied
    <output>/labels/<image stem>.txt
    <output>/data.yaml               nc, names (supervision's), train and val: images

The folder appears in one step when complete (built next to it first).
"""

import os
import shutil
from collections import defaultdict
from typing import Dict, List

import numpy as np
import supervision as sv
import yaml

from ..io.atomic import temporary_directory
from ..segment.rle import rle_to_masks

__all__ = ["check_yolo_names", "write_yolo_dataset", "yolo_detections"]

# Images per DetectionDataset handed to supervision: its annotations (with full-size masks) are
# held in memory, so a large dataset is exported in parts into the same folders.
EXPORT_CHUNK = 256


def check_yolo_names(names: Dict[str, str]) -> None:
    """
    A YOLO dataset keeps its images in one folder and labels them by file stem: two inputs
    with the same base name (``a/x.jpg``, ``b/x.jpg``) or the same stem (``x.jpg``, ``x.png``)
    cannot both be in it.

    Args:
        names: ``{file name under the image root: path}`` of the run.

    Raises:
        ValueError: naming the first clashing files.
    """
    by_stem = defaultdict(list)
    for name in sorted(names):
        by_stem[os.path.splitext(os.path.basename(name))[0]].append(name)
    clashes = [group for group in by_stem.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(", ".join(group) for group in clashes[:3])
        raise ValueError(
            f"--format yolo puts every image in one images/ folder with a labels/<stem>.txt: "
            f"{len(clashes)} group(s) of inputs share a file name stem ({shown}). Rename them, "
            "or label them with --format coco (which keeps the subfolders)"
        )


def yolo_detections(image: Dict, annotations: List[Dict], segmentation: bool) -> sv.Detections:
    """
    One image's COCO annotations (:func:`~grounding_dino.io.coco_files.coco_dataset`) as
    ``sv.Detections``: ``xyxy`` (N, 4) pixels, ``class_id`` (N,) indexing the class list
    (``category_id - 1``), ``confidence`` (N,), and ``mask`` (N, H, W) bool decoded from the
    RLE ``segmentation`` when ``segmentation``.
    """
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    mask = None
    if segmentation:
        if annotations:
            mask = rle_to_masks([a["segmentation"] for a in annotations]).numpy()
        else:
            mask = np.zeros((0, image["height"], image["width"]), dtype=bool)
    return sv.Detections(
        xyxy=boxes,
        mask=mask,
        class_id=np.array([a["category_id"] - 1 for a in annotations], dtype=int),
        confidence=np.array([a["score"] for a in annotations], dtype=np.float32),
    )


def write_yolo_dataset(
    output: str, dataset: Dict, paths: Dict[str, str], *, segmentation: bool
) -> None:
    """
    Writes ``dataset`` as a YOLO dataset folder ``output`` (replacing an earlier export of the
    same run: the caller has checked that the run owns ``output``).

    Args:
        output: the folder to write.
        dataset: the run's COCO dataset (``images``, ``annotations``, ``categories``).
        paths: ``{file name: the image's path}``: the files copied into ``images/``.
        segmentation: write polygons from the masks (the annotations' RLE ``segmentation``)
            instead of boxes.
    """
    classes = [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]
    by_image = defaultdict(list)
    for annotation in dataset["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    building = temporary_directory(output)
    try:
        images_dir = os.path.join(building, "images")
        labels_dir = os.path.join(building, "labels")
        os.makedirs(images_dir)  # also when no image was labelled: the layout stays whole
        os.makedirs(labels_dir)
        images = dataset["images"]
        for start in range(0, len(images), EXPORT_CHUNK):
            chunk = images[start : start + EXPORT_CHUNK]
            annotations = {
                paths[image["file_name"]]: yolo_detections(
                    image, by_image[image["id"]], segmentation
                )
                for image in chunk
            }
            sv.DetectionDataset(classes, list(annotations), annotations).as_yolo(
                images_directory_path=images_dir, annotations_directory_path=labels_dir
            )
        data_yaml = os.path.join(building, "data.yaml")
        sv.DetectionDataset(classes, [], {}).as_yolo(data_yaml_path=data_yaml)
        with open(data_yaml) as f:
            data = yaml.safe_load(f)
        # Where Ultralytics finds the images (relative to data.yaml's folder); there is one
        # split: hold some images out yourself for an honest validation.
        data.update(train="images", val="images")
        with open(data_yaml, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        _swap_into_place(building, output)
    finally:
        if os.path.lexists(building):
            shutil.rmtree(building)


def _swap_into_place(building: str, output: str) -> None:
    """Renames the complete folder ``building`` to ``output``; an earlier ``output`` is moved
    aside first and removed after."""
    if not os.path.lexists(output):
        os.rename(building, output)
        return
    old = temporary_directory(output)
    os.rmdir(old)
    os.rename(output, old)
    os.rename(building, output)
    shutil.rmtree(old)
