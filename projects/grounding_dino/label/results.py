"""
The labeller's result files (``labels.json`` and ``labels.json.errors``), each written whole or
not at all: into a new temporary file of an unpredictable name next to it (created with
``O_EXCL``, so never through a symlink), fsynced, given the mode a plain ``open`` would give,
then renamed over the target.
"""

import json
import os
import tempfile
from typing import Dict, List

__all__ = ["write_text_atomic", "write_json_atomic", "write_errors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str, text: str) -> None:
    """Replaces ``path`` by a file holding ``text``, atomically (see the module doc)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is not what users expect
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomic(path: str, data) -> None:
    """``data`` as compact JSON, atomically."""
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))


def write_errors(path: str, failed: List[Dict]) -> None:
    """
    ``<output>.errors``: one ``path<TAB>reason`` line per image that failed or was skipped,
    atomically; an earlier run's file is removed when none did.
    """
    if not failed:
        if os.path.exists(path):
            os.remove(path)
        return
    lines = []
    for record in failed:
        reason = " ".join(str(record["error"]).split())  # one line
        lines.append(f"{record['path']}\t{reason}\n")
    write_text_atomic(path, "".join(lines))
