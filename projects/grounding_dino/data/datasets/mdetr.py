"""RefCOCO/+/g and Flickr30k entities from MDETR's annotation files (COCO format + captions)."""

import functools
import json
import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ...text.captions import check_spans
from .checks import check_box, require_dir, require_file

__all__ = ["load_mdetr_json", "register_mdetr"]

logger = logging.getLogger(__name__)


def load_mdetr_json(
    json_file: str, image_root: str, task: str = "grounding", dataset_name: Optional[str] = None
) -> List[Dict]:
    """
    Loads an MDETR-style annotation file (COCO format whose images carry a ``caption`` and
    whose annotations carry ``tokens_positive``), one record per caption.

    Args:
        json_file: e.g. ``final_refcoco_val.json`` or ``final_flickr_separateGT_train.json``.
        image_root: folder of the images (``coco/train2014``, ``flickr30k-images``).
        task: "rec" (one expression, one box: records get ``"task": "rec"``) or "grounding".
        dataset_name: name used in messages.

    Returns:
        Grounding dataset dicts (docs/interfaces.md); boxes in XYWH_ABS.

    Raises:
        FileNotFoundError: naming a missing file or folder.
        ValueError: naming the image id of a record without caption, with a span outside its
            caption, or (REC) without exactly one box.
    """
    if task not in ("rec", "grounding"):
        raise ValueError(f"task must be 'rec' or 'grounding', got {task!r}")
    require_file(json_file, "Annotation file")
    require_dir(image_root, "Image folder")
    with open(json_file) as f:
        data = json.load(f)
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{json_file} has no '{key}' list: is it an MDETR annotation file?")
    annotations_of: Dict[int, List[Dict]] = {}
    for anno in data["annotations"]:
        annotations_of.setdefault(anno["image_id"], []).append(anno)

    records = []
    for image in data["images"]:
        where = f"{json_file}: image id {image.get('id')!r}"
        caption = image.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where} has no caption")
        annotations = []
        for anno in annotations_of.get(image["id"], []):
            spans = anno.get("tokens_positive")
            if not spans:
                raise ValueError(f"{where}: annotation {anno.get('id')!r} has no tokens_positive")
            check_spans(caption, [spans], what=f"{where}, annotation {anno.get('id')!r}")
            obj = {
                "bbox": check_box(anno["bbox"], where),
                "bbox_mode": BoxMode.XYWH_ABS,
                "tokens_positive": [[int(b), int(e)] for b, e in spans],
                "iscrowd": int(anno.get("iscrowd", 0)),
            }
            phrase_id = anno.get("phrase_ids", anno.get("phrase_id"))
            if isinstance(phrase_id, int):
                obj["phrase_id"] = phrase_id
            annotations.append(obj)
        if task == "rec" and len(annotations) != 1:
            raise ValueError(f"{where} is a REC record with {len(annotations)} boxes, not 1")
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "height": image["height"],
            "width": image["width"],
            "image_id": image["id"],
            "caption": caption,
            "annotations": annotations,
        }
        if task == "rec":
            record["task"] = "rec"
        for key in ("original_img_id", "sentence_id", "tokens_positive_eval", "dataset_name"):
            if key in image:
                record[key] = image[key]
        records.append(record)
    logger.info(f"Loaded {len(records)} captions from {json_file}")
    return records


def register_mdetr(
    name: str,
    json_file: str,
    image_root: str,
    task: str = "grounding",
    evaluator_type: Optional[str] = None,
) -> None:
    """
    Registers an MDETR-style annotation file lazily (see :func:`load_mdetr_json`).

    Args:
        name: dataset name.
        json_file: MDETR annotation json.
        image_root: image folder.
        task: "rec" or "grounding".
        evaluator_type: metadata ``evaluator_type``; "rec" for REC, else "flickr30k".
    """
    DatasetCatalog.register(
        name, functools.partial(load_mdetr_json, json_file, image_root, task, name)
    )
    if evaluator_type is None:
        evaluator_type = "rec" if task == "rec" else "flickr30k"
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type=evaluator_type, task=task
    )
