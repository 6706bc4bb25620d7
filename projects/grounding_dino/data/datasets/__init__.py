"""
Dataset registration: LVIS v1 minival, ODinW (any COCO-format folder), RefCOCO/+/g and
Flickr30k entities (MDETR annotations), ODVG jsonl files (Objects365, COCO, GoldG...), and a
user's own COCO-format dataset (``register_coco_format``, which checks its files when called
and can rename the categories).

COCO 2017 (``coco_2017_train``/``coco_2017_val``) and LVIS v1 val (``lvis_v1_val``) are
registered by detectron2 itself and reused. Everything is lazy: files are read when
``DatasetCatalog.get(name)`` is called, and a missing file or folder is reported then, by name.
See ``datasets/README.md`` for the folder layout under ``$DETECTRON2_DATASETS``.

Importing this package registers the standard splits (``builtin.py``).
"""

from .builtin import (
    LVIS_MINIVAL,
    MDETR_SPLITS,
    ODVG_SPLITS,
    register_all_grounding_datasets,
)
from .coco_format import get_thing_classes, register_lvis_minival, register_odinw
from .mdetr import load_mdetr_json, register_mdetr
from .odinw import ODINW_DATASETS, ODINW_SUITES, OdinwSuite, register_odinw_suite
from .odvg import load_odvg_jsonl, register_odvg
from .user import coco_format_categories, register_coco_format

__all__ = [
    "coco_format_categories",
    "load_mdetr_json",
    "load_odvg_jsonl",
    "register_mdetr",
    "register_coco_format",
    "register_odinw",
    "register_odinw_suite",
    "OdinwSuite",
    "ODINW_DATASETS",
    "ODINW_SUITES",
    "register_odvg",
    "register_lvis_minival",
    "register_all_grounding_datasets",
    "get_thing_classes",
    "LVIS_MINIVAL",
    "MDETR_SPLITS",
    "ODVG_SPLITS",
]
