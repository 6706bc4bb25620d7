"""ODVG jsonl files (Open-GroundingDino's format): Objects365, COCO, GoldG..."""

import functools
import json
import logging
import os
from typing import Dict, List, Mapping, Optional, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ...text.captions import check_spans
from .checks import check_box, require_dir, require_file

__all__ = ["load_odvg_jsonl", "register_odvg"]

logger = logging.getLogger(__name__)


def _read_label_map(label_map: Union[str, Mapping]) -> Dict[str, str]:
    if isinstance(label_map, str):
        require_file(label_map, "Label map")
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
    require_file(jsonl_file, "Annotation file")
    require_dir(image_root, "Image folder")
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
                "bbox": check_box(obj.get("bbox"), f"{where}, instance {i}"),
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
                "bbox": check_box(region.get("bbox"), f"{where}, region {i}"),
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
