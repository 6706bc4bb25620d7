"""Checks shared by the dataset loaders: files that must exist and well-formed boxes."""

import os
from typing import List

__all__ = ["require_file", "require_dir", "check_box"]


def require_file(path: str, what: str) -> None:
    """Raises FileNotFoundError naming ``what`` and ``path`` when the file does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist (see datasets/README.md)")


def require_dir(path: str, what: str) -> None:
    """Raises FileNotFoundError naming ``what`` and ``path`` when the folder does not exist."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist (see datasets/README.md)")


def check_box(bbox, where: str) -> List[float]:
    """The 4 numbers of ``bbox`` as floats; ValueError naming ``where`` otherwise."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be 4 numbers, got {bbox!r}")
    return [float(v) for v in bbox]
