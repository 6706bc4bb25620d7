"""Zero-shot evaluation of an ODinW suite: COCO AP per dataset and their average (GLIP's).

Each dataset is evaluated as zero-shot COCO detection: the prompt is the dataset's own category
names (``thing_classes`` of its annotation file), the evaluator the one its metadata names
(:func:`build_evaluator`, ``ZeroShotDetectionEvaluator``), the loop detectron2's
``inference_on_dataset``. The suite's score is the mean of the datasets' AP, as GLIP and
Grounding DINO report it.
"""

import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from tabulate import tabulate

from ..data.datasets import get_thing_classes
from .inference import InferenceWithSettings, evaluation_settings

__all__ = ["evaluate_datasets", "summarize_suite", "format_suite_table"]

logger = logging.getLogger(__name__)


def evaluate_datasets(cfg, model, names: Sequence[str], output_dir: str) -> Dict[str, Dict]:
    """
    Evaluates ``model`` on each dataset with the config's test loader and evaluator.

    Args:
        cfg: a LazyConfig with ``dataloader.test`` and ``dataloader.evaluator``; per dataset,
            ``dataloader.test.dataset.names``, the test mapper's ``thing_classes`` and the
            evaluator's ``dataset_name`` and ``output_dir`` are set (in place).
        model: the model, in eval mode, on its device.
        names: registered detection datasets.
        output_dir: each dataset's evaluator writes under ``output_dir/<name>``.

    Returns:
        ``{name: {"bbox": {"AP", "AP50", ...}, "num_images": int, "num_classes": int}}``.
    """
    results = OrderedDict()
    test, evaluator = cfg.dataloader.test, cfg.dataloader.evaluator
    for name in names:
        # Set in place: the nodes keep their interpolations into the rest of the config.
        test.dataset.names = name
        classes = get_thing_classes(name)
        if "thing_classes" in test.mapper:
            test.mapper.thing_classes = classes
        evaluator.dataset_name = name
        evaluator.output_dir = os.path.join(output_dir, name)
        logger.info(f"Evaluating {name} ({len(classes)} classes: {', '.join(classes)})")
        wrapped = InferenceWithSettings(model, evaluation_settings(model))
        out = inference_on_dataset(wrapped, instantiate(test), instantiate(evaluator))
        if "bbox" not in out:
            raise KeyError(f"The evaluator of {name} returned {sorted(out)}, no 'bbox' results")
        results[name] = {
            "bbox": dict(out["bbox"]),
            "num_images": len(DatasetCatalog.get(name)),
            "num_classes": len(classes),
        }
    return results


def summarize_suite(
    suite: str, results: Mapping[str, Dict], missing: Mapping[str, str], suite_size: int
) -> Dict:
    """
    The suite's summary: per-dataset AP and their mean.

    A dataset whose AP is NaN (the model returned no detection at all) counts as 0 in the
    average, and is named in ``nan_as_zero``.

    Args:
        suite: "odinw13" or "odinw35".
        results: :func:`evaluate_datasets`' results.
        missing: ``{name: why}`` of the datasets not evaluated (not on disk).
        suite_size: number of datasets in the suite.

    Returns:
        dict with ``suite``, ``datasets`` (name -> AP, AP50, AP75, #images, #classes),
        ``average_AP`` (None when nothing was evaluated), ``num_evaluated``, ``suite_size``,
        ``missing`` and ``nan_as_zero``.
    """
    datasets, aps, nan_as_zero = OrderedDict(), [], []
    for name, result in results.items():
        bbox = result["bbox"]
        datasets[name] = {
            "AP": bbox.get("AP"),
            "AP50": bbox.get("AP50"),
            "AP75": bbox.get("AP75"),
            "num_images": result["num_images"],
            "num_classes": result["num_classes"],
        }
        ap = bbox.get("AP")
        if ap is None or math.isnan(ap):
            nan_as_zero.append(name)
            ap = 0.0
        aps.append(ap)
    return {
        "suite": suite,
        "datasets": datasets,
        "average_AP": sum(aps) / len(aps) if aps else None,
        "num_evaluated": len(aps),
        "suite_size": suite_size,
        "missing": dict(missing),
        "nan_as_zero": nan_as_zero,
    }


def format_suite_table(summary: Dict) -> str:
    """The per-dataset table, the average (over how many) and the missing datasets, as text."""
    rows: List[list] = [
        [name, d["num_images"], d["num_classes"], d["AP"], d["AP50"], d["AP75"]]
        for name, d in summary["datasets"].items()
    ]
    lines = [
        tabulate(
            rows,
            headers=["dataset", "#images", "#classes", "AP", "AP50", "AP75"],
            tablefmt="pipe",
            floatfmt=".2f",
        )
    ]
    n, size = summary["num_evaluated"], summary["suite_size"]
    if summary["average_AP"] is None:
        lines.append(f"\n{summary['suite']}: no dataset evaluated (0 of {size}).")
    else:
        partial = "" if n == size else f" (NOT the suite's average: {size - n} not evaluated)"
        lines.append(
            f"\n{summary['suite']} average AP over {n} of {size} datasets: "
            f"{summary['average_AP']:.2f}{partial}"
        )
    if summary["nan_as_zero"]:
        lines.append(
            "AP is NaN (no detections) and counted as 0 for: " + ", ".join(summary["nan_as_zero"])
        )
    if summary["missing"]:
        lines.append(f"Missing ({len(summary['missing'])}):")
        lines.extend(f"  {name}: {why}" for name, why in summary["missing"].items())
    return "\n".join(lines)
