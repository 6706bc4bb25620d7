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

``--config-file`` takes a lazy config (``.py``, or the converter's ``config.yaml``) or a thin
yacs ``.yaml`` (``MODEL.GROUNDING_DINO.CONFIG_FILE``). ``--opts key=value`` overrides either
kind (lazy keys like ``model.box_threshold=0.3``, or yacs keys like ``MODEL.DEVICE=cpu``).

Drawings keep each input's path under the inputs' common folder (``out/x/a.jpg``,
``out/y/a.jpg``); an ``--output`` that would write over an input is refused. ``--json`` is a
valid JSON list after every image, so an interrupted run keeps what it did. ``--nms`` (default
0.5, 0 = off) removes duplicate boxes per class or phrase. To label many images into a COCO
dataset, resumable and on several workers, use ``python -m grounding_dino.label``.

A file that cannot be read or processed gets an error naming it; the run goes on with the
rest and exits with status 1 at the end.
"""

import argparse
import ast
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.utils.colormap import colormap
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from grounding_dino import GroundingDINOPredictor, InferenceSettings
from grounding_dino.label.coco import JsonListWriter
from grounding_dino.label.inputs import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    expand_inputs,
    is_video,
    plan_outputs,
)
from grounding_dino.label.loader import read_bgr
from grounding_dino.model_zoo import add_model_arguments, load_config
from grounding_dino.preprocessing import check_token_spans


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
        help="write all detections as COCO results (bbox xywh) to FILE, image by image",
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
    return parser


# ---------------------------------------------------------------- config and predictor
def build_predictor(args) -> Tuple[GroundingDINOPredictor, Optional[object]]:
    """
    Returns:
        the predictor, and the default prompt of a yacs config (None for lazy configs).
    """
    config = load_config(args.config_file, args.opts, args.weights)
    predictor = GroundingDINOPredictor.from_model_config(
        config, device=args.device, dtype=args.dtype
    )
    return predictor, config.default_prompt


def demo_settings(defaults: InferenceSettings, args) -> InferenceSettings:
    """The predictor's settings with ``--box-threshold``, ``--text-threshold`` (when given)
    and ``--nms``."""
    changes = {"nms_threshold": args.nms}
    if args.box_threshold is not None:
        changes["box_threshold"] = args.box_threshold
    if args.text_threshold is not None:
        changes["text_threshold"] = args.text_threshold
    return defaults.replace(**changes)


def parse_prompt(text: Optional[str], rec: bool, token_spans: bool):
    """A caption stays a string; text with commas becomes class names (not for --rec/spans)."""
    if text is None:
        return None
    if rec or token_spans or "," not in text:
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--prompt {text!r} holds no class names")
    return names


def parse_token_spans(text: str, caption: str):
    try:
        spans = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"--token-spans {text!r} is not a list literal: {error}") from error
    return check_token_spans(caption, spans)


# ---------------------------------------------------------------- inputs
def video_frames(path: str) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"{path}: cannot open the video")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield frame
    finally:
        capture.release()


# ---------------------------------------------------------------- outputs
def draw(image_bgr: np.ndarray, output: Dict) -> np.ndarray:
    """Boxes with "phrase score" labels, drawn by detectron2's Visualizer. Returns RGB."""
    instances = output["instances"].to("cpu")
    visualizer = Visualizer(image_bgr[:, :, ::-1])
    palette = colormap(rgb=True, maximum=1)
    phrases = output["phrases"]
    color_of = {p: palette[i % len(palette)] for i, p in enumerate(dict.fromkeys(phrases))}
    labels = [f"{p} {s:.2f}" for p, s in zip(phrases, instances.scores.tolist())]
    drawn = visualizer.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        labels=labels,
        assigned_colors=[color_of[p] for p in phrases],
    )
    return drawn.get_image()


def coco_results(output: Dict, image_id: int, file_name: str, frame: Optional[int]) -> List[Dict]:
    """COCO-results records (bbox xywh in pixels) with the phrase and source file added."""
    instances = output["instances"].to("cpu")
    records = []
    boxes = instances.pred_boxes.tensor.tolist()
    for box, score, cls, phrase in zip(
        boxes, instances.scores.tolist(), instances.pred_classes.tolist(), output["phrases"]
    ):
        x0, y0, x1, y1 = box
        record = {
            "image_id": image_id,
            "category_id": int(cls),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(score),
            "phrase": phrase,
            "file_name": file_name,
        }
        if frame is not None:
            record["frame"] = frame
        records.append(record)
    return records


# ---------------------------------------------------------------- main loop
def report_error(message: str) -> None:
    """Prints an error line to stderr without breaking the progress bar."""
    tqdm.write(f"ERROR {message}", file=sys.stderr)


class Runner:
    def __init__(
        self,
        predictor: GroundingDINOPredictor,
        prompt,
        args,
        token_spans=None,
        targets: Optional[Dict[str, str]] = None,
        json_writer: Optional[JsonListWriter] = None,
    ):
        self.predictor = predictor
        self.settings = demo_settings(predictor.settings, args)
        self.prompt = prompt
        self.args = args
        self.token_spans = token_spans
        self.targets = targets or {}
        self.json_writer = json_writer
        self.next_image_id = 0

    def predict(self, image_bgr: np.ndarray) -> Dict:
        if self.args.rec:
            return self.predictor.predict_rec(image_bgr, self.prompt, self.settings)
        if self.token_spans is not None:
            return self.predictor.predict_token_spans(
                image_bgr, self.prompt, self.token_spans, self.settings
            )
        return self.predictor(image_bgr, self.prompt, self.settings)

    def record(self, output: Dict, path: str, frame: Optional[int] = None) -> None:
        if self.json_writer is not None:
            self.json_writer.extend(coco_results(output, self.next_image_id, path, frame))
        self.next_image_id += 1

    def _target(self, path: str) -> Optional[str]:
        target = self.targets.get(path)
        if target:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        return target

    def image(self, path: str) -> str:
        image = read_bgr(path)
        output = self.predict(image)
        self.record(output, path)
        target = self._target(path)
        if target:
            if not cv2.imwrite(target, draw(image, output)[:, :, ::-1]):
                raise ValueError(f"{target}: cannot write the picture")
        phrases = ", ".join(dict.fromkeys(output["phrases"])) or "-"
        return f"{path}: {len(output['instances'])} boxes ({phrases})"

    def video(self, path: str) -> str:
        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise ValueError(f"{path}: cannot open the video")
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        capture.release()
        target = self._target(path)
        writer, count, boxes = None, 0, 0
        try:
            for frame in tqdm(
                video_frames(path), total=total, desc=os.path.basename(path), leave=False
            ):
                output = self.predict(frame)
                self.record(output, path, count)
                boxes += len(output["instances"])
                if target:
                    drawn = draw(frame, output)[:, :, ::-1]
                    if writer is None:
                        height, width = drawn.shape[:2]
                        writer = cv2.VideoWriter(
                            target, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
                        )
                    writer.write(np.ascontiguousarray(drawn))
                count += 1
        finally:
            if writer is not None:
                writer.release()
        if count == 0:
            raise ValueError(f"{path}: no frames could be read")
        return f"{path}: {count} frames, {boxes} boxes"


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
        if args.json and os.path.realpath(args.json) in {os.path.realpath(p) for p in paths}:
            raise ValueError(f"--json {args.json} is one of the inputs; it is not overwritten")
        predictor, default_prompt = build_predictor(args)
        prompt = parse_prompt(args.prompt, args.rec, args.token_spans is not None)
        if prompt is None:
            prompt = default_prompt
        if prompt is None:
            raise ValueError("--prompt is required (a caption, or comma-separated class names)")
        token_spans = None
        if args.token_spans is not None:
            token_spans = parse_token_spans(args.token_spans, prompt)
    except (FileNotFoundError, ValueError, KeyError) as error:
        parser.error(str(error))

    for message in errors:
        report_error(message)
    json_writer = JsonListWriter(args.json) if args.json else None
    runner = Runner(predictor, prompt, args, token_spans, targets, json_writer)
    progress = tqdm(paths, desc="images", unit="file", disable=len(paths) < 2)
    try:
        for path in progress:
            try:
                summary = runner.video(path) if is_video(path) else runner.image(path)
                tqdm.write(summary)
            except (OSError, ValueError) as error:
                message = str(error) if path in str(error) else f"{path}: {error}"
                report_error(message)
                errors.append(message)
    finally:
        if json_writer is not None:
            json_writer.close()
            tqdm.write(f"Wrote {json_writer.count} detections to {args.json}")
    if errors:
        report_error(f"{len(errors)} input(s) failed:\n  " + "\n  ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    setup_logger(name="grounding_dino")
    setup_logger(name="detectron2")
    torch.set_grad_enabled(False)
    sys.exit(main())
