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

A file that cannot be read or processed gets an error naming it; the run goes on with the
rest and exits with status 1 at the end.
"""

import argparse
import ast
import glob
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
import yaml
from detectron2.config import LazyConfig
from detectron2.data.detection_utils import read_image
from detectron2.utils.colormap import colormap
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from grounding_dino.config import (
    add_grounding_dino_config,
    default_prompt_from_yacs,
    load_lazy_config_from_yacs,
)
from grounding_dino.predictor import GroundingDINOPredictor, check_token_spans

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="lazy config (.py / converter's config.yaml) or thin yacs .yaml",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint (default: the config's init_checkpoint / MODEL.WEIGHTS)",
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
        help="folder for the drawn pictures (a file name for a single image)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write all detections as COCO results (bbox xywh) to FILE",
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
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    return parser


# ---------------------------------------------------------------- config and predictor
def _is_yacs_file(path: str) -> bool:
    if not path.endswith((".yaml", ".yml")):
        return False
    with open(path) as f:
        content = yaml.safe_load(f)
    return isinstance(content, dict) and "MODEL" in content


def _split_opts(opts: List[str]) -> List[Tuple[str, str]]:
    pairs = []
    for item in opts:
        if "=" not in item:
            raise ValueError(f"--opts: {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        pairs.append((key, value))
    return pairs


def build_predictor(args) -> Tuple[GroundingDINOPredictor, Optional[object]]:
    """
    Returns:
        the predictor, and the default prompt of a yacs config (None for lazy configs).
    """
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file} not found")
    pairs = _split_opts(args.opts)
    default_prompt = None
    if _is_yacs_file(args.config_file):
        from detectron2.config import get_cfg

        cfg = get_cfg()
        add_grounding_dino_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list([x for pair in pairs for x in pair])
        lazy = load_lazy_config_from_yacs(cfg)
        weights = args.weights or cfg.MODEL.WEIGHTS or None
        device = args.device or cfg.MODEL.DEVICE
        default_prompt = default_prompt_from_yacs(cfg)
    else:
        lazy = LazyConfig.load(args.config_file)
        lazy = LazyConfig.apply_overrides(lazy, [f"{k}={v}" for k, v in pairs])
        weights = args.weights
        device = args.device
    if device:
        lazy.train = dict(lazy.get("train", {}), device=device)
    predictor = GroundingDINOPredictor(lazy, weights=weights)
    if args.box_threshold is not None:
        predictor.model.box_threshold = args.box_threshold
    if args.text_threshold is not None:
        predictor.model.text_threshold = args.text_threshold
    return predictor, default_prompt


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
def expand_inputs(patterns: List[str]) -> Tuple[List[str], List[str]]:
    """
    Files, globs and folders -> (paths, errors). Folders give their image and video files
    (sorted, not recursive). Paths are kept in order, without repeats.
    """
    paths, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
                and os.path.isfile(os.path.join(pattern, name))
            )
            if not found:
                errors.append(f"{pattern}: folder has no image or video files")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(glob.glob(os.path.expanduser(pattern)))
            found = [p for p in found if os.path.isfile(p)]
            if not found:
                errors.append(f"{pattern}: no such file, folder or matching glob")
        for path in found:
            if path not in paths:
                paths.append(path)
    return paths, errors


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def read_bgr(path: str) -> np.ndarray:
    """Reads an image file (EXIF orientation applied) as HxWx3 uint8 BGR."""
    try:
        image = read_image(path, format="BGR")
    except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for bad files
        raise ValueError(f"{path}: cannot read the image ({error})") from error
    return np.ascontiguousarray(image)


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


def output_path(args, path: str, many: bool) -> Optional[str]:
    if not args.output:
        return None
    if (
        many
        or os.path.isdir(args.output)
        or not args.output.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    ):
        os.makedirs(args.output, exist_ok=True)
        name = os.path.basename(path)
        if not name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
            name += ".jpg"
        return os.path.join(args.output, name)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    return args.output


# ---------------------------------------------------------------- main loop
def report_error(message: str) -> None:
    """Prints an error line to stderr without breaking the progress bar."""
    tqdm.write(f"ERROR {message}", file=sys.stderr)


class Runner:
    def __init__(self, predictor: GroundingDINOPredictor, prompt, args, token_spans=None):
        self.predictor = predictor
        self.prompt = prompt
        self.args = args
        self.token_spans = token_spans
        self.results: List[Dict] = []
        self.next_image_id = 0

    def predict(self, image_bgr: np.ndarray) -> Dict:
        if self.args.rec:
            return self.predictor.predict_rec(image_bgr, self.prompt)
        if self.token_spans is not None:
            return self.predictor.predict_token_spans(image_bgr, self.prompt, self.token_spans)
        return self.predictor(image_bgr, self.prompt)

    def record(self, output: Dict, path: str, frame: Optional[int] = None) -> None:
        self.results.extend(coco_results(output, self.next_image_id, path, frame))
        self.next_image_id += 1

    def image(self, path: str, many: bool) -> str:
        image = read_bgr(path)
        output = self.predict(image)
        self.record(output, path)
        target = output_path(self.args, path, many)
        if target:
            if not cv2.imwrite(target, draw(image, output)[:, :, ::-1]):
                raise ValueError(f"{target}: cannot write the picture")
        phrases = ", ".join(dict.fromkeys(output["phrases"])) or "-"
        return f"{path}: {len(output['instances'])} boxes ({phrases})"

    def video(self, path: str, many: bool) -> str:
        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise ValueError(f"{path}: cannot open the video")
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        capture.release()
        target = output_path(self.args, path, many)
        if target and not is_video(target):
            target = os.path.splitext(target)[0] + ".mp4"
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
    try:
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

    paths, errors = expand_inputs(args.input)
    for message in errors:
        report_error(message)
    runner = Runner(predictor, prompt, args, token_spans)
    many = len(paths) > 1
    progress = tqdm(paths, desc="images", unit="file", disable=len(paths) < 2)
    for path in progress:
        try:
            summary = runner.video(path, many) if is_video(path) else runner.image(path, many)
            tqdm.write(summary)
        except (OSError, ValueError) as error:
            message = str(error) if path in str(error) else f"{path}: {error}"
            report_error(message)
            errors.append(message)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(runner.results, f)
        tqdm.write(f"Wrote {len(runner.results)} detections to {args.json}")
    if errors:
        report_error(f"{len(errors)} input(s) failed:\n  " + "\n  ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    setup_logger(name="grounding_dino")
    setup_logger(name="detectron2")
    torch.set_grad_enabled(False)
    sys.exit(main())
