"""Helpers shared by the per-query evaluators (REC, Flickr30k): saving the gathered records and
grouping them by split."""

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.utils.file_io import PathManager

__all__ = ["check_ranking_args", "dump_records", "group_by_split"]


def check_ranking_args(topk: Sequence[int], iou_threshold: float) -> Tuple[int, ...]:
    """Validates the k of R@k / P@k and the hit IoU; returns ``topk`` as a tuple of ints."""
    topk = tuple(int(k) for k in topk)
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be a non-empty list of positive ints, got {topk}.")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    return topk


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
