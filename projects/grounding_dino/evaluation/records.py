"""Helpers shared by the per-query evaluators (REC, Flickr30k): saving the gathered records and
grouping them by split."""

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from detectron2.utils.file_io import PathManager

__all__ = ["dump_records", "group_by_split"]


def dump_records(records: List[Dict], output_dir: Optional[str], filename: str) -> None:
    """Writes ``records`` as JSON to ``output_dir/filename`` (nothing when no output_dir)."""
    if not output_dir:
        return
    PathManager.mkdirs(output_dir)
    with PathManager.open(os.path.join(output_dir, filename), "w") as f:
        json.dump(records, f)


def group_by_split(records: List[Dict]) -> "OrderedDict[Optional[str], List[Dict]]":
    """``{None: all records, split: the records of that split, ...}`` (splits sorted); records
    carry a ``"split"`` field (None when the dataset has no splits)."""
    groups = OrderedDict([(None, records)])
    for split in sorted({r["split"] for r in records if r["split"] is not None}):
        groups[split] = [r for r in records if r["split"] == split]
    return groups
