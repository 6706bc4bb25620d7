"""CPU time of the mask stage (``grounding_dino.segment``) per image, beside the detector's.

Usage::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python tools/benchmark_masks.py \\
        [--threads 2] [--runs 3] [--boxes 1 10 50] [--size 768x1024] [--no-detector] [--tiny]

What it does:

1. Builds, with random weights (no hub here), transformers' ``SamModel`` with SAM ViT-B's
   sizes (``SamConfig()``'s defaults: ViT-B/16, 1024 px input) and ``Sam2Model`` with SAM 2.1
   Hiera-tiny's (``Sam2Config()``'s defaults), each with its default processor (1024 px), as
   :class:`~grounding_dino.segment.MaskStage` (fp32, the CPU).
2. Times, on one ``--size`` image (default 768x1024: its longest side is the segmenters'
   1024 px input), the image embedding alone and a whole mask-stage call (embedding + every
   box through the prompt encoder and mask decoder in batches of 64 + post-processing to image
   size) with 1, 10 and 50 boxes. One warm-up call, then ``--runs`` timed calls; medians.
3. Times the detector on the same image: grounding-dino-tiny's architecture (Swin-T +
   BERT-base, random weights, converted as ``tools/benchmark.py`` does; ``--workdir`` keeps
   and reuses it), through :class:`~grounding_dino.GroundingDINOPredictor` with its official
   resize (shorter side 800), so the ratio mask stage / detector is measured in one process.

``--tiny`` uses small configurations (for tests). The timings depend on the machine's load:
the load average and the CPU are printed with them.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Dict, List

import torch
from benchmark import _timed

from grounding_dino.comparison.reference import load_ours, make_image, parse_size, prepare_models
from grounding_dino.comparison.training import load_average
from grounding_dino.precision import cpu_model_name
from grounding_dino.segment import MaskStage
from grounding_dino.segment.loading import SEGMENTER_KINDS

__all__ = ["main", "segmenter_stage"]

CAPTION = "a cat . a remote control . a person on the left ."


def segmenter_stage(kind: str, tiny: bool) -> MaskStage:
    """A random-weight SAM ViT-B (``kind="sam"``) or SAM 2 Hiera-tiny (``"sam2"``) stage."""
    from transformers import Sam2Config, Sam2Model, SamConfig, SamModel

    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from sam_reference import build_segmenter

        model, processor = build_segmenter(kind)
    else:
        model_class, config = {"sam": (SamModel, SamConfig), "sam2": (Sam2Model, Sam2Config)}[kind]
        model = model_class(config()).eval()
        processor = _default_processor(kind)
    return MaskStage(model, processor, SEGMENTER_KINDS[kind])


def _default_processor(kind: str):
    from transformers import Sam2ImageProcessorFast, Sam2Processor, SamImageProcessor, SamProcessor

    if kind == "sam2":
        return Sam2Processor(Sam2ImageProcessorFast())
    return SamProcessor(SamImageProcessor())


def _boxes(count: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count)
    corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([corners.min(1).values, corners.max(1).values + 8], dim=1)


def _median_time(function, runs: int, label: str = "") -> Dict:
    function()  # warm-up
    times = [_timed(function) for _ in range(runs)]
    if label:  # progress: a long run under load shows what it has measured so far
        print(f"{label}: median {statistics.median(times):.3f} s of {times}", flush=True)
    return {"median_s": statistics.median(times), "runs_s": times}


def time_stage(
    stage: MaskStage, image_rgb, box_counts: List[int], runs: int, name: str = ""
) -> Dict:
    """Median seconds of the embedding alone and of whole calls with each box count."""
    inputs = stage.processor(images=image_rgb, return_tensors="pt")
    results = {
        "embedding": _median_time(
            lambda: stage.model.get_image_embeddings(inputs["pixel_values"]),
            runs,
            f"{name} embedding",
        )
    }
    height, width = image_rgb.shape[:2]
    for count in box_counts:
        boxes = _boxes(count, height, width)
        results[f"{count} boxes"] = _median_time(
            lambda boxes=boxes: stage(image_rgb, boxes, keep_logits=False),
            runs,
            f"{name} {count} boxes",
        )
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per entry (default 3)")
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--size", default="768x1024", help="image HEIGHTxWIDTH (default 768x1024)")
    parser.add_argument("--no-detector", action="store_true", help="skip the detector's timing")
    parser.add_argument("--tiny", action="store_true", help="small models (for tests)")
    parser.add_argument("--workdir", help="keep/reuse the converted detector here")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = parse_size(args.size)
    image_bgr = make_image(args.size)
    image_rgb = image_bgr[:, :, ::-1].copy()
    print(f"CPU: {cpu_model_name()}; torch threads {args.threads}; load average {load_average()}")
    results = {"size": args.size, "threads": args.threads, "cpu": cpu_model_name()}
    names = {"sam": "SAM ViT-B", "sam2": "SAM 2.1 Hiera-T"}
    with torch.no_grad():
        for kind in ("sam", "sam2"):
            stage = segmenter_stage(kind, args.tiny)
            results[names[kind]] = time_stage(stage, image_rgb, args.boxes, args.runs, names[kind])
            del stage
        if not args.no_detector:
            with tempfile.TemporaryDirectory() as scratch:
                workdir = args.workdir or scratch
                _, out_dir = prepare_models(workdir, args.tiny)
                predictor = load_ours(out_dir, (800, 1333))
                results["detector"] = _median_time(
                    lambda: predictor(image_bgr, CAPTION), args.runs, "detector"
                )
    results["load_average_after"] = load_average()
    _print_table(results, args.boxes, height, width)
    if args.json:
        with open(args.json, "x") as stream:  # never over a user's file
            json.dump(results, stream, indent=2)
    return 0


def _print_table(results: Dict, box_counts: List[int], height: int, width: int) -> None:
    detector = results.get("detector", {}).get("median_s")
    columns = ["embedding"] + [f"{count} boxes" for count in box_counts]
    print(f"\nmask stage per {height}x{width} image, median s (x the detector's time)")
    print("| segmenter | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in ("SAM ViT-B", "SAM 2.1 Hiera-T"):
        cells = []
        for column in columns:
            seconds = results[name][column]["median_s"]
            ratio = f" ({seconds / detector:.2f}x)" if detector else ""
            cells.append(f"{seconds:.3f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if detector:
        print(f"| detector (Swin-T, shorter side 800) | {detector:.3f} | |")
    print(f"load average after: {results['load_average_after']}")


if __name__ == "__main__":
    sys.exit(main())
