"""
Checks the files of every dataset a run reads (training and test) before the first
iteration, so that a wrong ``dataset.test_json`` fails at start-up, not at the first
evaluation ``train.eval_period`` iterations later.
"""

import copy
import os
from typing import List

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["check_dataset_paths"]

_MISSING = object()
# Metadata fields that name a dataset's files (detectron2's register_coco_instances,
# register_lvis_instances and the project's registrations set them).
_PATH_FIELDS = (("json_file", os.path.isfile, "file"), ("image_root", os.path.isdir, "folder"))


def _dataset_names(cfg, key: str) -> List[str]:
    """The dataset names at ``key`` (a name, a list, or a call returning them, such as
    ``register_coco_format``, which checks the files it registers, naming their config keys)."""
    node = OmegaConf.select(cfg, key, default=_MISSING)
    if node is _MISSING or node is None:
        return []
    if isinstance(node, DictConfig) and "_target_" in node:
        node = instantiate(copy.deepcopy(node))
    elif isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    names = [node] if isinstance(node, str) else list(node)
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise KeyError(
                f"{key}: dataset {name!r} is not registered (see datasets/README.md; a dataset "
                "of your own is registered with register_coco_instances or, from the config, "
                "register_coco_format)"
            )
    return names


def check_dataset_paths(cfg, splits=("train", "test")) -> None:
    """
    Checks that the annotation file and image folder of every dataset of
    ``dataloader.<split>.dataset.names`` exist, for each split in ``splits`` that the config
    has (a loader built otherwise is not checked here; nor are datasets whose metadata says
    ``generated_on_load``, whose loader writes their files).

    Raises:
        KeyError: a dataset name is not registered (the message names the config key).
        FileNotFoundError: a dataset's file or folder is missing (the message names the config
            key, the dataset, its metadata field and the path).
        ValueError: a file registered from the config is empty or malformed
            (``register_coco_format``'s checks).
    """
    for split in splits:
        key = f"dataloader.{split}.dataset.names"
        for name in _dataset_names(cfg, key):
            metadata = MetadataCatalog.get(name)
            if metadata.get("generated_on_load", False):  # e.g. the synthetic shapes
                continue
            for field, exists, kind in _PATH_FIELDS:
                path = metadata.get(field, None)
                if isinstance(path, str) and path and "://" not in path and not exists(path):
                    raise FileNotFoundError(
                        f"{key}: dataset {name!r} reads {field}={path}: no such {kind} (checked "
                        "before the first iteration; see datasets/README.md)"
                    )
