"""
Accuracy and wall time of one model in several precision modes (:mod:`grounding_dino.precision`),
evaluated with the project's evaluators as ``train_net.py --eval-only`` evaluates (no score
threshold, the top 300 detections per image), and the markdown table of
``tools/evaluate_precision.py``: one row per mode, the change from the first (reference) mode,
and a label on modes losing more than a limit.
"""

import math
import os
import time
from typing import Dict, List, Optional

from detectron2.config import instantiate
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import DatasetEvaluator

from ..engine.evaluation import evaluate as evaluate_model
from ..precision import outputs_to_fp32, precision_context
from .build import build_evaluator

__all__ = ["METRICS", "evaluate_modes", "label_losses", "markdown_table"]

# The headline metrics of each evaluator's results: (results key, metric names).
METRICS = {"bbox": ("AP", "AP50"), "rec": ("Acc@0.5",)}


class _FirstImages(DatasetEvaluator):
    """An evaluator scoring only the images it was given (COCO AP over a subset)."""

    def __init__(self, evaluator: DatasetEvaluator):
        self.evaluator, self.image_ids = evaluator, []

    def reset(self):
        self.evaluator.reset()
        self.image_ids = []

    def process(self, inputs, outputs):
        self.image_ids.extend(i["image_id"] for i in inputs)
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        if hasattr(self.evaluator, "_eval_predictions"):  # detectron2's COCOEvaluator
            return self.evaluator.evaluate(img_ids=sorted(set(self.image_ids)))
        return self.evaluator.evaluate()


def _loader(cfg, dataset: str, max_images: Optional[int]):
    cfg.dataloader.test.dataset.names = dataset
    dicts = instantiate(cfg.dataloader.test.dataset)
    if max_images is not None:
        dicts = dicts[:max_images]
    return build_detection_test_loader(
        dataset=dicts,
        mapper=instantiate(cfg.dataloader.test.mapper),
        batch_size=int(cfg.dataloader.test.get("batch_size", 1)),
        num_workers=0,
    )


def _headline(results: Dict) -> Dict[str, Optional[float]]:
    metrics = {}
    for key, names in METRICS.items():
        for name in names:
            if key in results and name in results[key]:
                value = float(results[key][name])
                metrics[name] = value if math.isfinite(value) else None
    if not metrics:
        raise KeyError(f"The evaluator returned {sorted(results)}, none of {sorted(METRICS)}")
    return metrics


def evaluate_modes(
    cfg,
    model,
    modes: List[str],
    datasets: List[str],
    output_dir: str,
    max_images: Optional[int] = None,
) -> Dict:
    """
    Evaluates ``model`` on each dataset (the first ``max_images`` records of each, default
    all) in each mode; the evaluators write under ``output_dir/<mode>/<dataset>``.

    Returns:
        ``{"modes": {mode: {dataset: {metric: value, "seconds": s}}}, "images": {dataset: n}}``
        (``n``: the records evaluated: images, or expressions for REC).
    """
    device = model.device
    results: Dict = {"modes": {}, "images": {}}
    for mode in modes:
        # The predictor's contract in every mode: float32 outputs.
        hook = model.register_forward_hook(lambda module, inputs, outputs: outputs_to_fp32(outputs))
        try:
            per_dataset = {}
            for dataset in datasets:
                loader = _loader(cfg, dataset, max_images)
                results["images"][dataset] = len(loader.dataset)
                folder = os.path.join(output_dir, mode, dataset)
                evaluator = _FirstImages(build_evaluator(dataset, output_dir=folder))
                start = time.perf_counter()
                with precision_context(mode, device):
                    out = evaluate_model(model, loader, evaluator)
                seconds = time.perf_counter() - start
                per_dataset[dataset] = {**_headline(out), "seconds": round(seconds, 2)}
                print(f"[{mode}] {dataset}: {per_dataset[dataset]}", flush=True)
            results["modes"][mode] = per_dataset
        finally:
            hook.remove()
    return results


def label_losses(results: Dict, max_loss: float) -> Dict[str, List[str]]:
    """Per mode, ``"<dataset> <metric> -x.xx"`` for each headline metric (AP, Acc@0.5) more
    than ``max_loss`` points below the first (reference) mode's."""
    modes = list(results["modes"])
    reference = results["modes"][modes[0]]
    losses = {}
    for mode in modes:
        found = []
        for dataset, metrics in results["modes"][mode].items():
            for name in ("AP", "Acc@0.5"):
                base, value = reference[dataset].get(name), metrics.get(name)
                if base is not None and value is not None and base - value > max_loss:
                    found.append(f"{dataset} {name} {value - base:+.2f}")
        losses[mode] = found
    return losses


def markdown_table(results: Dict, losses: Dict[str, List[str]], max_loss: float) -> str:
    """One row per mode: each dataset's metrics (change from the reference) and seconds."""
    modes = list(results["modes"])
    reference = results["modes"][modes[0]]
    datasets = list(reference)
    header = ["mode"]
    for dataset in datasets:
        names = [n for n in reference[dataset] if n != "seconds"]
        header += [f"{dataset} {n}" for n in names] + [f"{dataset} s"]
    header.append("note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in modes:
        row = [mode]
        for dataset in datasets:
            metrics = results["modes"][mode][dataset]
            for name in (n for n in reference[dataset] if n != "seconds"):
                value, base = metrics.get(name), reference[dataset].get(name)
                if value is None:
                    row.append("n/a")
                elif mode == modes[0] or base is None:
                    row.append(f"{value:.2f}")
                else:
                    row.append(f"{value:.2f} ({value - base:+.2f})")
            row.append(f"{metrics['seconds']:.1f}")
        note = f"LOSES > {max_loss:g}: " + ", ".join(losses[mode]) if losses[mode] else ""
        row.append("reference" if mode == modes[0] else note)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
