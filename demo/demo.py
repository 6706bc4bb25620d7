#!/usr/bin/env python
"""Grounding DINO demo: detect what a text prompt names in images or a video, draw the boxes.

Examples::

    python demo/demo.py --config-file configs/grounding_dino_swin_t_ogc.py --weights model.pth \\
        --input photos/ "more/*.jpg" clip.mp4 --prompt "cat . remote control ." \\
        --output out/ --json out/results.json

    # class names (comma-separated); a thin yacs config works too
    python demo/demo.py --config-file configs/grounding_dino_swin_t_ogc.yaml \\
        --weights model.pth --input cat.jpg --prompt "cat, remote control" --output out/

    # referring expression: exactly one box
    python demo/demo.py ... --input cat.jpg --prompt "the cat on the left" --rec

    # ground only some phrases of a caption, by character spans (official --token_spans)
    python demo/demo.py ... --prompt "a cat and a dog" --token-spans "[[[2,5]],[[12,15]]]"

    # Grounded-SAM: a mask for every box (a transformers SAM / SAM-HQ / SAM 2 folder), drawn
    # and written to --json as RLE "segmentation"
    python demo/demo.py ... --input cat.jpg --prompt "cat" --sam sam-vit-base/ --output out/

``--config-file`` takes a lazy config (``.py``, or the converter's ``config.yaml``) or a thin
yacs ``.yaml`` (``MODEL.GROUNDING_DINO.CONFIG_FILE``). ``--opts key=value`` overrides either
kind (lazy keys like ``model.box_threshold=0.3``, or yacs keys like ``MODEL.DEVICE=cpu``).

Drawings keep each input's path under the inputs' common folder (``out/x/a.jpg``,
``out/y/a.jpg``); an ``--output`` that would write over an input is refused. The demo never
writes over a file: a drawing, ``--json`` or error report that exists is refused before the
model loads (``--force`` replaces them). Every result appears in one step when complete;
``--json`` grows image by image in ``.<name>.<random>.partial`` next to it and is renamed at
the end (also on Ctrl-C), so a killed run leaves what it did there. ``--nms`` (default 0.5,
0 = off) removes duplicate boxes per class or phrase. To label many images into a COCO
dataset, resumable and on several workers, use ``python -m grounding_dino.label``.

A file that cannot be read, processed or written (any error, the model's included) gets an
``ERROR`` line naming it; the run goes on with the rest, writes the failures to the error
report (``--errors``, by default ``<--json>.errors``, else ``<--output>/errors.txt``), says how
many failed and where the report is, and exits with status 1.
"""

import argparse
import os
import sys
from typing import Optional, Sequence, Tuple

import torch
from detectron2.utils.logger import setup_logger

from grounding_dino import GroundingDINOPredictor, InferenceSettings
from grounding_dino.devices import resolve_device
from grounding_dino.io.atomic import atomic_file, refuse_existing
from grounding_dino.io.coco_files import JsonListWriter
from grounding_dino.io.detect_files import FileDetector, report_error
from grounding_dino.io.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, expand_inputs, plan_outputs
from grounding_dino.model_zoo import add_model_arguments, load_config
from grounding_dino.preprocessing import parse_prompt, parse_token_spans
from grounding_dino.segment.cli import add_sam_arguments, mask_stage_from_args


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, globs (quote them), folders or videos",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help='a caption ("cat . remote control .") or comma-separated class '
        'names ("cat, remote control"); with --rec, the expression',
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder for the drawn pictures, named by their path under the inputs' folder "
        "(a file name for a single image); never an input file",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write all detections as COCO results (bbox xywh; with --sam also the mask as an "
        "RLE segmentation) to FILE, image by image",
    )
    parser.add_argument(
        "--errors",
        default=None,
        metavar="FILE",
        help="the report of the inputs that failed, one 'file: reason' line each, written when "
        "one fails (default: <--json>.errors, else <--output>/errors.txt for a folder or "
        "<--output>.errors for a file; without either, the ERROR lines only)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace drawings, --json and --errors files that exist (never an input)",
    )
    parser.add_argument(
        "--nms",
        type=float,
        default=0.5,
        help="class-wise NMS IoU threshold (per phrase for captions); 0 turns it off",
    )
    parser.add_argument(
        "--box-threshold",
        type=float,
        default=None,
        help="keep boxes whose score exceeds this (default: the config's)",
    )
    parser.add_argument(
        "--text-threshold",
        type=float,
        default=None,
        help="tokens above this score form a box's phrase (default: config's)",
    )
    parser.add_argument(
        "--rec",
        action="store_true",
        help="referring expression mode: exactly one box, the best one",
    )
    parser.add_argument(
        "--token-spans",
        default=None,
        help="phrases to ground as character spans of --prompt, e.g. "
        '"[[[0,3]],[[4,8]]]" (one list of [beg, end] spans per phrase)',
    )
    add_model_arguments(parser)
    add_sam_arguments(parser)
    return parser


def build_predictor(args) -> Tuple[GroundingDINOPredictor, Optional[object]]:
    """
    Returns:
        the predictor (with the ``--sam`` mask stage, on the same device and precision), and
        the default prompt of a yacs config (None for lazy configs).
    """
    config = load_config(args.config_file, args.opts, args.weights)
    device = resolve_device(args.device or config.device, config.lazy)
    predictor = GroundingDINOPredictor.from_model_config(
        config,
        device=device,
        dtype=args.dtype,
        mask_stage=mask_stage_from_args(args, device=device, dtype=args.dtype),
    )
    return predictor, config.default_prompt


def demo_settings(defaults: InferenceSettings, args) -> InferenceSettings:
    """The predictor's settings with ``--box-threshold``, ``--text-threshold`` (when given),
    ``--nms`` and ``--rec``."""
    changes = {"nms_threshold": args.nms, "rec": args.rec}
    if args.box_threshold is not None:
        changes["box_threshold"] = args.box_threshold
    if args.text_threshold is not None:
        changes["text_threshold"] = args.text_threshold
    return defaults.replace(**changes)


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.rec and args.token_spans:
        parser.error("--rec and --token-spans cannot be combined")
    if not 0 <= args.nms <= 1:
        parser.error(f"--nms {args.nms}: an IoU threshold in [0, 1] (0: no NMS)")
    paths, errors = expand_inputs(args.input, extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    try:
        targets = plan_outputs(args.output, args.input, paths)
        inputs = {os.path.realpath(p) for p in paths}
        report = error_report_path(args, targets)
        for option, path in [("--json", args.json), ("--errors", report)]:
            if path and os.path.realpath(path) in inputs:
                raise ValueError(f"{option} {path} is one of the inputs; it is not overwritten")
            refuse_existing([path] if path else [], force=args.force, what=option)
        refuse_existing(list(targets.values()), force=args.force, what=f"--output {args.output}")
        predictor, default_prompt = build_predictor(args)
        split_commas = not (args.rec or args.token_spans is not None)
        prompt = parse_prompt(args.prompt, split_commas)
        if prompt is None:
            prompt = default_prompt
        if prompt is None:
            raise ValueError("--prompt is required (a caption, or comma-separated class names)")
        token_spans = None
        if args.token_spans is not None:
            token_spans = parse_token_spans(args.token_spans, prompt)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        parser.error(str(error))

    for message in errors:
        report_error(message)
    settings = demo_settings(predictor.settings, args)
    json_writer = JsonListWriter(args.json, replace=args.force) if args.json else None
    detector = FileDetector(
        predictor,
        prompt,
        settings,
        token_spans=token_spans,
        targets=targets,
        json_writer=json_writer,
        replace=args.force,
    )
    try:
        detector.run(paths)
    finally:  # also on Ctrl-C: what was done is published, what failed is reported
        errors += detector.errors
        try:
            if json_writer is not None:
                json_writer.close()
                print(f"Wrote {json_writer.count} detections to {args.json}")
        finally:
            write_error_report(report, errors)
    return 1 if errors else 0


def error_report_path(args, targets) -> Optional[str]:
    """``--errors``, else next to ``--json``, else in (or next to) ``--output``; None without
    any of them."""
    if args.errors or args.json:
        return args.errors or args.json + ".errors"
    if not targets:
        return None
    if list(targets.values()) == [args.output]:  # a single drawing's file name
        return args.output + ".errors"
    return os.path.join(args.output, "errors.txt")


def write_error_report(report: Optional[str], errors: Sequence[str]) -> None:
    """Writes the failures to ``report`` in one step (when any failed; an earlier run's report
    that ``--force`` replaces is removed when none did) and says how many failed and where."""
    if not errors:
        if report and os.path.lexists(report):
            os.remove(report)
            print(f"Nothing failed: removed the earlier error report {report}")
        return
    where = "listed above"
    if report:
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
        with atomic_file(report) as f:
            f.writelines(" ".join(message.split()) + "\n" for message in errors)
        where = f"listed in {report}"
    report_error(f"{len(errors)} input(s) failed ({where})")


if __name__ == "__main__":
    setup_logger(name="grounding_dino")
    setup_logger(name="detectron2")
    torch.set_grad_enabled(False)
    sys.exit(main())
