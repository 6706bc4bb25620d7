"""
Time saved by the text encoder's cache (``model.text_encoder.cache_size``) on a fixed class
list over many images: the same predictor with the cache off (``cache_size=0``) and on,
timed alternately in one process on the same images, threads and class list, and checked for
equal outputs.

Usage::

    python tools/benchmark_text_cache.py --weights output/demo/model_final.pth
    python tools/benchmark_text_cache.py --weights W --config-file C --classes lvis \\
        --images 8 --runs 3 --threads 2

``--classes lvis`` (the default) is LVIS v1's 1203 category names (detectron2's
``LVIS_V1_CATEGORIES``, cleaned as the LVIS zero-shot config cleans them), which the model
splits into passes of at most ``max_text_len`` tokens; ``--classes coco`` is COCO's 80. The
config is ``--config-file``, else the ``config.yaml`` next to ``--weights``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from grounding_dino.io.atomic import atomic_file

__all__ = ["main", "class_list", "time_cache"]


def class_list(name: str) -> List[str]:
    """LVIS v1 (1203) or COCO (80) category names, cleaned for prompts."""
    from grounding_dino.text import clean_category_name

    if name == "lvis":
        from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

        names = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    elif name == "coco":
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

        names = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    else:
        raise SystemExit(f"--classes must be lvis or coco, got {name!r}")
    return [clean_category_name(n) for n in names]


def _images(count: int, size: int) -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _same(a: Dict, b: Dict) -> Dict:
    x, y = a["instances"], b["instances"]
    if len(x) != len(y):
        return {"equal_count": False}
    result = {"equal_count": True, "same_phrases": a["phrases"] == b["phrases"]}
    if len(x):
        result["max_score_diff"] = float((x.scores - y.scores).abs().max())
        result["max_box_diff_px"] = float((x.pred_boxes.tensor - y.pred_boxes.tensor).abs().max())
    return result


def time_cache(config: str, weights: str, classes: List[str], images, runs: int) -> Dict:
    """Median seconds per image of the predictor with the cache off and on (alternating)."""
    from grounding_dino import GroundingDINOPredictor

    predictors = {
        "off": GroundingDINOPredictor.from_config_file(
            config, weights, ["model.text_encoder.cache_size=0"]
        ),
        "on": GroundingDINOPredictor.from_config_file(
            config, weights, ["model.text_encoder.cache_size=64"]
        ),
    }
    runs_per_prompt = len(
        predictors["on"].model.prompt_encoder.runs_for_input(0, {"category_names": classes})
    )
    check = _same(predictors["off"](images[0], classes), predictors["on"](images[0], classes))
    times = {name: [] for name in predictors}
    for run in range(runs):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            for image in images:
                predictor(image, classes)
            times[name].append((time.perf_counter() - start) / len(images))
        print(
            f"run {run + 1}/{runs}: off {times['off'][-1]:.3f} s/img, "
            f"on {times['on'][-1]:.3f} s/img",
            flush=True,
        )
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "classes": len(classes),
        "passes_per_image": runs_per_prompt,
        "images": len(images),
        "seconds_per_image": medians,
        "runs": times,
        "speedup": medians["off"] / medians["on"],
        "cache": predictors["on"].model.text_encoder.cache_info(),
        "outputs": check,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark_text_cache.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--config-file", default=None, help="default: config.yaml by --weights")
    parser.add_argument("--classes", default="lvis", help="lvis or coco")
    parser.add_argument("--images", type=int, default=4, help="images per timed run")
    parser.add_argument("--size", type=int, default=256, help="square image side (px)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    for name in ("images", "size", "runs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights} does not exist")
    if args.config_file is None:
        args.config_file = os.path.join(os.path.dirname(args.weights), "config.yaml")
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"config file {args.config_file} does not exist (--config-file)")
    if args.output and os.path.exists(args.output):
        raise SystemExit(f"--output {args.output} exists; not overwritten")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = time_cache(
        args.config_file,
        args.weights,
        class_list(args.classes),
        _images(args.images, args.size),
        args.runs,
    )
    print(json.dumps(result, indent=2))
    if args.output:
        with atomic_file(args.output, replace=False) as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
