"""Data side of Grounding DINO: the dataset mapper, augmentations and dataset registration.

Importing this package registers the standard datasets (see ``datasets/``) lazily.
"""

from .datasets import (
    get_thing_classes,
    load_mdetr_json,
    load_odvg_jsonl,
    register_all_grounding_datasets,
    register_lvis_minival,
    register_mdetr,
    register_odinw,
    register_odvg,
)
from .mapper import GroundingDatasetMapper, record_kind
from .samplers import build_kind_sampler, kind_repeat_factors, kind_shares
from .transforms import (
    RandomSelect,
    build_test_augmentations,
    build_train_augmentations,
    count_hflips,
)

__all__ = [
    "GroundingDatasetMapper",
    "RandomSelect",
    "build_kind_sampler",
    "build_test_augmentations",
    "build_train_augmentations",
    "count_hflips",
    "get_thing_classes",
    "kind_repeat_factors",
    "kind_shares",
    "load_mdetr_json",
    "load_odvg_jsonl",
    "record_kind",
    "register_all_grounding_datasets",
    "register_lvis_minival",
    "register_mdetr",
    "register_odinw",
    "register_odvg",
]
