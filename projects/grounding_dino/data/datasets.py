"""
Dataset registration: LVIS v1 minival, ODinW (any COCO-format folder), RefCOCO/+/g and
Flickr30k entities (MDETR annotations), and ODVG jsonl files (Objects365, COCO, GoldG...).

COCO 2017 (``coco_2017_train``/``coco_2017_val``) and LVIS v1 val (``lvis_v1_val``) are
registered by detectron2 itself and reused. Everything is lazy: files are read when
``DatasetCatalog.get(name)`` is called, and a missing file or folder is reported then, by name.
See ``datasets/README.md`` for the folder layout under ``$DETECTRON2_DATASETS``.
"""

import functools
import json
import logging
import os
from typing import Dict, List, Mapping, Optional, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json
from detectron2.structures import BoxMode

from ..text.captions import check_spans

__all__ = [
    "load_mdetr_json",
    "load_odvg_jsonl",
    "register_mdetr",
    "register_odinw",
    "register_odvg",
    "register_lvis_minival",
    "register_all_grounding_datasets",
    "get_thing_classes",
    "MDETR_SPLITS",
]

logger = logging.getLogger(__name__)

# name -> (annotation file, image folder, task), relative to the datasets root.
MDETR_SPLITS: Dict[str, tuple] = {}
for _ds, _splits in [
    ("refcoco", ("train", "val", "testA", "testB")),
    ("refcoco+", ("train", "val", "testA", "testB")),
    ("refcocog", ("train", "val", "test")),
]:
    for _split in _splits:
        MDETR_SPLITS[f"{_ds}_{_split}"] = (
            f"mdetr_annotations/final_{_ds}_{_split}.json",
            "coco/train2014",
            "rec",
        )
for _split in ("train", "val", "test"):
    MDETR_SPLITS[f"flickr30k_{_split}"] = (
        f"mdetr_annotations/final_flickr_separateGT_{_split}.json",
        "flickr30k/flickr30k-images",
        "grounding",
    )

# name -> (jsonl, image folder, label map or None)
ODVG_SPLITS = {
    "objects365_train_odvg": (
        "objects365/annotations/objects365_train_odvg.jsonl",
        "objects365/train",
        "objects365/annotations/objects365_label_map.json",
    ),
    "coco_2017_train_odvg": (
        "coco/annotations/coco2017_train_odvg.jsonl",
        "coco/train2017",
        "coco/annotations/coco2017_label_map.json",
    ),
}

LVIS_MINIVAL = ("lvis/lvis_v1_minival_inserted_image_name.json", "coco/")


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist (see datasets/README.md)")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist (see datasets/README.md)")


def _check_box(bbox, where: str) -> List[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be 4 numbers, got {bbox!r}")
    return [float(v) for v in bbox]


# ------------------------------------------------------------------------------------------
# MDETR (RefCOCO/+/g, Flickr30k entities)
# ------------------------------------------------------------------------------------------
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
    _require_file(json_file, "Annotation file")
    _require_dir(image_root, "Image folder")
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
                "bbox": _check_box(anno["bbox"], where),
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


# ------------------------------------------------------------------------------------------
# ODVG jsonl
# ------------------------------------------------------------------------------------------
def _read_label_map(label_map: Union[str, Mapping]) -> Dict[str, str]:
    if isinstance(label_map, str):
        _require_file(label_map, "Label map")
        with open(label_map) as f:
            label_map = json.load(f)
    if not isinstance(label_map, Mapping) or not label_map:
        raise ValueError(f"A label map must be a non-empty {{label: name}} dict, got {label_map!r}")
    return {str(k): str(v) for k, v in label_map.items()}


def _sorted_labels(label_map: Dict[str, str]) -> List[str]:
    try:
        return sorted(label_map, key=int)
    except ValueError:
        return sorted(label_map)


def load_odvg_jsonl(
    jsonl_file: str,
    image_root: str,
    label_map: Optional[Union[str, Mapping]] = None,
    dataset_name: Optional[str] = None,
) -> List[Dict]:
    """
    Loads an ODVG jsonl file (Open-GroundingDino's format, one image per line, boxes xyxy).

    With a label map, lines are detection records (``detection.instances[*].label``, mapped
    to ``category_id`` = rank of the label in the label map, so ``thing_classes`` are the
    label map's names in label order). Without, lines are grounding records
    (``grounding.caption`` and ``grounding.regions[*]`` with ``bbox`` and
    ``tokens_positive``, or a ``phrase`` found in the caption).

    Args:
        jsonl_file: the annotation file.
        image_root: folder the ``filename`` fields are relative to.
        label_map: path of a ``{"0": "person", ...}`` json file, or that dict.
        dataset_name: when given, its metadata gets ``thing_classes``.

    Returns:
        Dataset dicts; ``image_id`` is the 1-based line number.

    Raises:
        FileNotFoundError: naming a missing file or folder.
        ValueError: naming the line of a record without caption/instances, with an unknown
            label, or with a span outside its caption.
    """
    _require_file(jsonl_file, "Annotation file")
    _require_dir(image_root, "Image folder")
    labels = None
    if label_map is not None:
        names = _read_label_map(label_map)
        labels = {label: i for i, label in enumerate(_sorted_labels(names))}
        if dataset_name is not None:
            thing_classes = [names[label] for label in _sorted_labels(names)]
            MetadataCatalog.get(dataset_name).set(thing_classes=thing_classes)

    records = []
    with open(jsonl_file) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{jsonl_file}: line {line_number}"
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid json: {e}") from e
            for key in ("filename", "height", "width"):
                if key not in meta:
                    raise ValueError(f"{where} has no '{key}'")
            record = {
                "file_name": os.path.join(image_root, meta["filename"]),
                "height": int(meta["height"]),
                "width": int(meta["width"]),
                "image_id": line_number,
            }
            if labels is not None:
                record["annotations"] = _odvg_detection(meta, labels, where)
            else:
                record["caption"], record["annotations"] = _odvg_grounding(meta, where)
            records.append(record)
    logger.info(f"Loaded {len(records)} images from {jsonl_file}")
    return records


def _odvg_detection(meta: Dict, labels: Dict[str, int], where: str) -> List[Dict]:
    detection = meta.get("detection")
    if not isinstance(detection, dict) or "instances" not in detection:
        raise ValueError(f"{where} has no detection.instances (a label map was given)")
    annotations = []
    for i, obj in enumerate(detection["instances"]):
        label = str(obj.get("label"))
        if label not in labels:
            raise ValueError(f"{where}: instance {i} has label {label!r}, not in the label map")
        annotations.append(
            {
                "bbox": _check_box(obj.get("bbox"), f"{where}, instance {i}"),
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": labels[label],
            }
        )
    return annotations


def _odvg_grounding(meta: Dict, where: str):
    grounding = meta.get("grounding")
    if not isinstance(grounding, dict):
        raise ValueError(f"{where} has no 'grounding' (and no label map was given)")
    caption = grounding.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where} has no caption")
    annotations = []
    phrase_ids: Dict[str, int] = {}
    for i, region in enumerate(grounding.get("regions", [])):
        spans = region.get("tokens_positive")
        phrase = region.get("phrase")
        if not spans:
            start = caption.lower().find(str(phrase).lower()) if phrase else -1
            if start < 0:
                raise ValueError(
                    f"{where}: region {i} has no tokens_positive and its phrase {phrase!r} "
                    "is not in the caption"
                )
            spans = [[start, start + len(phrase)]]
        check_spans(caption, [spans], what=f"{where}, region {i}")
        key = phrase if phrase else str(spans)
        annotations.append(
            {
                "bbox": _check_box(region.get("bbox"), f"{where}, region {i}"),
                "bbox_mode": BoxMode.XYXY_ABS,
                "tokens_positive": [[int(b), int(e)] for b, e in spans],
                "phrase_id": phrase_ids.setdefault(key, len(phrase_ids)),
            }
        )
    return caption, annotations


def register_odvg(
    name: str,
    jsonl: str,
    image_root: str,
    label_map: Optional[Union[str, Mapping]] = None,
) -> None:
    """
    Registers an ODVG jsonl file lazily (see :func:`load_odvg_jsonl`). With a label map the
    dataset is a detection dataset whose ``thing_classes`` come from the label map (set now
    for a dict, when loaded for a file).
    """
    DatasetCatalog.register(
        name, functools.partial(load_odvg_jsonl, jsonl, image_root, label_map, name)
    )
    metadata = MetadataCatalog.get(name)
    metadata.set(json_file=jsonl, image_root=image_root)  # training data: no evaluator
    if isinstance(label_map, Mapping):
        names = _read_label_map(label_map)
        metadata.set(thing_classes=[names[label] for label in _sorted_labels(names)])


# ------------------------------------------------------------------------------------------
# COCO-format folders (ODinW) and LVIS minival
# ------------------------------------------------------------------------------------------
def _load_coco_checked(json_file: str, image_root: str, name: str) -> List[Dict]:
    _require_file(json_file, "Annotation file")
    _require_dir(image_root, "Image folder")
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
    _require_file(json_file, "Annotation file")
    _require_dir(image_root, "Image folder")
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


def register_all_grounding_datasets(root: Optional[str] = None) -> None:
    """
    Registers the standard splits under ``root`` ($DETECTRON2_DATASETS, default "datasets"):
    ``lvis_v1_minival``, ``refcoco{,+,g}_<split>``, ``flickr30k_<split>``,
    ``objects365_train_odvg`` and ``coco_2017_train_odvg``. Names already registered are kept.
    """
    root = os.path.expanduser(root or os.getenv("DETECTRON2_DATASETS", "datasets"))
    registered = set(DatasetCatalog.list())
    if "lvis_v1_minival" not in registered:
        json_file, image_root = LVIS_MINIVAL
        register_lvis_minival(
            "lvis_v1_minival", os.path.join(root, json_file), os.path.join(root, image_root)
        )
    for name, (json_file, image_root, task) in MDETR_SPLITS.items():
        if name not in registered:
            register_mdetr(
                name, os.path.join(root, json_file), os.path.join(root, image_root), task
            )
    for name, (jsonl, image_root, label_map) in ODVG_SPLITS.items():
        if name not in registered:
            register_odvg(
                name,
                os.path.join(root, jsonl),
                os.path.join(root, image_root),
                os.path.join(root, label_map) if label_map else None,
            )


register_all_grounding_datasets()
