"""
The standard grounding splits under ``$DETECTRON2_DATASETS`` (as detectron2's
``data/datasets/builtin.py``): LVIS v1 minival, RefCOCO/+/g, Flickr30k entities, the GQA part
of GoldG (MDETR's ``final_mixed_train_no_coco.json``) and the ODVG files of Objects365 and
COCO. Registered when ``grounding_dino.data`` is imported.
"""

import os
from typing import Dict, Optional

from detectron2.data import DatasetCatalog

from .coco_format import register_lvis_minival
from .mdetr import register_mdetr
from .odvg import register_odvg

__all__ = ["MDETR_SPLITS", "ODVG_SPLITS", "LVIS_MINIVAL", "register_all_grounding_datasets"]

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
# GoldG = Flickr30k entities + MDETR's "mixed" captions without the COCO images: Visual
# Genome / GQA images with GQA questions and VG region descriptions as captions (GLIP's
# "mixed_train_no_coco"; the images are GQA's images/ folder, named <VG image id>.jpg).
MDETR_SPLITS["mixed_train_no_coco"] = (
    "mdetr_annotations/final_mixed_train_no_coco.json",
    "gqa/images",
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


def register_all_grounding_datasets(root: Optional[str] = None) -> None:
    """
    Registers the standard splits under ``root`` ($DETECTRON2_DATASETS, default "datasets"):
    ``lvis_v1_minival``, ``refcoco{,+,g}_<split>``, ``flickr30k_<split>``,
    ``mixed_train_no_coco`` (GoldG's GQA part), ``objects365_train_odvg`` and
    ``coco_2017_train_odvg``. Names already registered are kept.
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
