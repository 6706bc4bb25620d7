"""
COCO files from predictor outputs: the records of labelled images and the COCO detection
dataset made of them, COCO results (the demo's ``--json``), JSON written atomically, and a JSON
list written record by record. When the instances carry ``pred_masks`` (the mask stage's), every
record also gets its mask as a COCO ``segmentation`` in run-length encoding (pycocotools' RLE,
``counts`` as a string) and its ``area`` is the mask's.
"""

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from pycocotools import mask as mask_utils

from ..segment.rle import masks_to_rle
from .atomic import atomic_file, publish, temporary_path

__all__ = [
    "JsonListWriter",
    "xywh_boxes",
    "instance_segmentations",
    "label_record",
    "error_record",
    "coco_dataset",
    "coco_results",
    "write_json_atomic",
    "write_errors",
]

BOX_DECIMALS, SCORE_DECIMALS = 2, 5


def xywh_boxes(instances) -> List[List[float]]:
    """The ``pred_boxes`` (xyxy) of ``Instances`` on the CPU as COCO ``[x, y, w, h]`` lists."""
    boxes = instances.pred_boxes.tensor.to(torch.float64)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def instance_segmentations(instances) -> Optional[List[Dict]]:
    """The ``pred_masks`` ((N, H, W) bool) of ``Instances`` on the CPU as N COCO RLEs
    (:func:`~grounding_dino.segment.rle.masks_to_rle`); None when they have no masks."""
    if not instances.has("pred_masks"):
        return None
    return masks_to_rle(instances.pred_masks)


def label_record(file_name: str, width: int, height: int, output: Dict) -> Dict:
    """
    One labelled image's record (a part-file line of the labeller) from the model's output.

    Args:
        file_name: the image's name relative to the image root.
        width, height: the image's size in pixels.
        output: ``{"instances": Instances(pred_boxes xyxy, scores, pred_classes[,
            pred_masks])}`` (after NMS), ``pred_classes`` indexing the class list.

    Returns:
        ``{"file_name", "width", "height", "boxes" (xywh), "classes", "scores"}``, and
        ``"segmentations"`` (COCO RLEs, one per box) when the instances have ``pred_masks``.
    """
    instances = output["instances"].to("cpu")
    record = {
        "file_name": file_name,
        "width": int(width),
        "height": int(height),
        "boxes": [[round(v, BOX_DECIMALS) for v in box] for box in xywh_boxes(instances)],
        "classes": [int(c) for c in instances.pred_classes.tolist()],
        "scores": [round(float(s), SCORE_DECIMALS) for s in instances.scores.tolist()],
    }
    segmentations = instance_segmentations(instances)
    if segmentations is not None:
        record["segmentations"] = segmentations
    return record


def error_record(file_name: str, path: str, reason: str) -> Dict:
    """An image that could not be labelled (the ``"error"`` key first: see
    :mod:`grounding_dino.io.parts`)."""
    prefix = f"{path}: "
    if reason.startswith(prefix):
        reason = reason[len(prefix) :]
    return {"error": reason, "file_name": file_name, "path": path}


def coco_dataset(
    file_names: Sequence[str], records: Dict[str, Dict], classes: Sequence[str], info: Dict
) -> Dict:
    """
    A COCO detection dataset of the labelled images.

    Args:
        file_names: the images in dataset order (those without a record are left out).
        records: label records by file name (:func:`label_record`).
        classes: the class names; category ids are 1..C in this order.
        info: the dataset's ``info`` entry (how it was made).

    Returns:
        ``{"info", "images": [{id, file_name, width, height}], "annotations": [{id,
        image_id, category_id, bbox (xywh), area, score, iscrowd: 0[, segmentation]}],
        "categories": [{id, name}]}``; image and annotation ids count from 1. A record with
        ``"segmentations"`` gives its annotations a ``segmentation`` (RLE) and the mask's area
        (``pycocotools.mask.area``); otherwise the area is the box's.
    """
    images, annotations = [], []
    for name in file_names:
        record = records.get(name)
        if record is None:
            continue
        image_id = len(images) + 1
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "width": record["width"],
                "height": record["height"],
            }
        )
        segmentations = record.get("segmentations") or [None] * len(record["boxes"])
        for box, category, score, segmentation in zip(
            record["boxes"], record["classes"], record["scores"], segmentations
        ):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category + 1,
                "bbox": box,
                "area": round(box[2] * box[3], BOX_DECIMALS),
                "score": score,
                "iscrowd": 0,
            }
            if segmentation is not None:
                annotation["segmentation"] = segmentation
                annotation["area"] = int(mask_utils.area(segmentation))
            annotations.append(annotation)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def coco_results(
    output: Dict, image_id: int, file_name: str, frame: Optional[int] = None
) -> List[Dict]:
    """
    COCO-results records of one image (or video frame), with its phrases and file added.

    Args:
        output: a predictor's ``{"instances", "phrases"}``.
        image_id: the records' ``image_id``.
        file_name: the image or video file.
        frame: the frame's index in a video (None for an image: no ``"frame"`` key).

    Returns:
        ``[{"image_id", "category_id" (pred_classes), "bbox" (xywh pixels), "score",
        "phrase", "file_name"[, "frame"][, "segmentation" (RLE)]}]``, one per box; the
        segmentation when the instances have ``pred_masks``.
    """
    instances = output["instances"].to("cpu")
    segmentations = instance_segmentations(instances) or [None] * len(instances)
    records = []
    for box, score, cls, phrase, segmentation in zip(
        xywh_boxes(instances),
        instances.scores.tolist(),
        instances.pred_classes.tolist(),
        output["phrases"],
        segmentations,
    ):
        record = {
            "image_id": image_id,
            "category_id": int(cls),
            "bbox": box,
            "score": float(score),
            "phrase": phrase,
            "file_name": file_name,
        }
        if frame is not None:
            record["frame"] = frame
        if segmentation is not None:
            record["segmentation"] = segmentation
        records.append(record)
    return records


def write_json_atomic(path: str, data, *, replace: bool = True) -> None:
    """Writes ``data`` as JSON to ``path`` in one step (a temporary file next to it, fsynced,
    renamed: :func:`~grounding_dino.io.atomic.atomic_file`); ``replace=False`` refuses a file
    that exists."""
    with atomic_file(path, replace=replace) as f:
        json.dump(data, f, separators=(",", ":"))


def write_errors(path: str, failed: List[Dict]) -> None:
    """
    ``<output>.errors``: one ``path<TAB>reason`` line per image that failed; an earlier
    run's file is removed when none failed.
    """
    if not failed:
        if os.path.exists(path):
            os.remove(path)
        return
    with atomic_file(path) as f:
        for record in failed:
            reason = " ".join(str(record["error"]).split())  # one line
            f.write(f"{record['path']}\t{reason}\n")


class JsonListWriter:
    """
    A JSON list written record by record to a temporary file next to ``path``
    (``.<name>.<random>.partial``): after every :meth:`extend` it is a complete JSON list of
    everything so far (flushed; fsynced at most once a second). :meth:`close` renames it to
    ``path`` in one step, also when the run is interrupted by an exception (Ctrl-C included),
    so an interrupted run keeps what it did; a killed one leaves it in :attr:`partial_path`.
    A context manager (closes the file).

    Args:
        path: the result file.
        replace: replace a file ``path`` that exists; else one is refused (before anything is
            written, and again when the result is renamed to it).

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false.
    """

    def __init__(self, path: str, *, replace: bool = False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.lexists(path) and not replace:
            raise FileExistsError(f"{path} exists; not replaced: pass --force to replace it")
        self.path = path
        self.replace = replace
        self.count = 0
        self.partial_path = temporary_path(path, ".partial")
        self._file = open(self.partial_path, "wb")
        self._file.write(b"[]")
        self._end = 1  # where the closing bracket is
        self._synced = 0.0
        self._flush()

    def _flush(self) -> None:
        self._file.flush()
        if time.monotonic() - self._synced > 1.0:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def extend(self, records: List[Dict]) -> None:
        if not records:
            return
        text = ",\n".join(json.dumps(r) for r in records)
        data = ((",\n" if self.count else "\n") + text).encode()
        self._file.seek(self._end)
        self._file.write(data + b"\n]")
        self._end += len(data)
        self.count += len(records)
        self._flush()

    def close(self) -> None:
        """Renames the list to ``path`` (once; later calls do nothing).

        Raises:
            FileExistsError: ``path`` appeared meanwhile and ``replace`` is false; the list
                stays in :attr:`partial_path`.
        """
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            publish(self.partial_path, self.path, replace=self.replace)
        except FileExistsError as error:
            raise FileExistsError(f"{error}; the results are in {self.partial_path}") from None

    def __enter__(self) -> "JsonListWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
