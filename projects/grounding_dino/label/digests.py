"""The digests that tie a labelling run to its models (config and weights, the segmenter's
folder)."""

import hashlib
import json
import os
from typing import Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["config_digest", "file_digest", "folder_digest"]


def _callable_name(value) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def config_digest(lazy) -> str:
    """SHA-256 of what decides a prediction: the ``model`` node and the test resize."""
    model = _plain(lazy.model)
    if isinstance(model, dict) and isinstance(model.get("text_encoder"), dict):
        # The text cache's size does not change a prediction.
        model["text_encoder"].pop("cache_size", None)
    content = {
        "model": model,
        "test_resize": _plain(OmegaConf.select(lazy, "dataloader.test.mapper.augmentations")),
    }
    text = json.dumps(content, sort_keys=True, default=_callable_name)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a file's bytes (None for None)."""
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(path: str) -> str:
    """SHA-256 over the names and the bytes of the files of a folder (a segmenter's: config,
    weights, processor), hidden files and subfolders left out."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not name.startswith(".") and os.path.isfile(file):
            digest.update(f"{name}\0{file_digest(file)}\0".encode())
    return digest.hexdigest()
