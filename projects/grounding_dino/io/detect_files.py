"""
A predictor over image and video files (the work of ``demo/demo.py``): each file's detections
drawn to its target file (:func:`~grounding_dino.io.inputs.plan_outputs`) and appended to a
COCO-results list (:class:`~grounding_dino.io.coco_files.JsonListWriter`); with a predictor
that has a mask stage, every box also has its mask (drawn, and in the list as an RLE
``segmentation``).

Example::

    paths, errors = expand_inputs(["photos/", "clip.mp4"], extensions=IMAGE_EXTENSIONS
                                  + VIDEO_EXTENSIONS)
    with JsonListWriter("out/results.json") as results:
        detector = FileDetector(predictor, ["cat", "remote control"],
                                targets=plan_outputs("out/", ["photos/", "clip.mp4"], paths),
                                json_writer=results)
        errors += detector.run(paths)
"""

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from ..modeling.settings import InferenceSettings
from ..preprocessing import Prompt
from ..visualization import draw
from .atomic import publish, temporary_path, write_bytes_atomic
from .coco_files import JsonListWriter, coco_results
from .images import read_bgr, video_frames, video_info
from .inputs import is_video

__all__ = ["FileDetector", "report_error", "open_video_writer", "VIDEO_CODECS"]

# The codec of each video ending that is not mp4v (WebM holds only VP8/VP9 and AV1).
VIDEO_CODECS = {".webm": "VP80"}


def report_error(message: str) -> None:
    """Prints an ``ERROR`` line to stderr without breaking a progress bar."""
    tqdm.write(f"ERROR {message}", file=sys.stderr)


def open_video_writer(
    path: str,
    fps: float,
    size: Tuple[int, int],
    codec: Optional[str] = None,
    *,
    name: Optional[str] = None,
) -> cv2.VideoWriter:
    """
    A ``cv2.VideoWriter`` for ``path``.

    Args:
        fps: frames per second.
        size: (width, height) of the frames.
        codec: a FourCC; None: the one of the path's ending (:data:`VIDEO_CODECS`, else mp4v).
        name: the file the error names (the result's, when ``path`` is its temporary file).

    Raises:
        ValueError: naming the file and the codec, when OpenCV cannot open the writer.
    """
    if codec is None:
        codec = VIDEO_CODECS.get(os.path.splitext(path)[1].lower(), "mp4v")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise ValueError(
            f"{name or path}: cv2.VideoWriter cannot write this video (codec {codec}, "
            f"{size[0]}x{size[1]}, {fps:g} fps); OpenCV's build has no such encoder for this "
            f"file type, or the folder is not writable"
        )
    return writer


class FileDetector:
    """
    Runs a predictor on image and video files with one prompt and one set of settings.

    Args:
        predictor: a ``GroundingDINOPredictor`` (or anything with its call, ``predict_rec``
            and ``predict_token_spans``).
        prompt: a caption or a list of class names; the expression when ``settings.rec``.
        settings: the calls' settings (None: the predictor's). ``rec=True`` finds exactly
            one box, the best one, for the expression.
        token_spans: phrases of the caption to ground, as character spans (checked ones:
            :func:`~grounding_dino.preprocessing.parse_token_spans`), or None.
        targets: the drawing's file of an input path (inputs not in it are not drawn).
        json_writer: where every detection goes as a COCO result (or None); image ids count
            images and video frames from 0 in the order they are processed.
        replace: replace drawings that exist (``--force``); else such a file is an error of
            its input. A drawing appears in one step when complete (written next to it first).
    """

    def __init__(
        self,
        predictor,
        prompt: Prompt,
        settings: Optional[InferenceSettings] = None,
        *,
        token_spans=None,
        targets: Optional[Dict[str, str]] = None,
        json_writer: Optional[JsonListWriter] = None,
        replace: bool = False,
    ):
        self.predictor = predictor
        self.prompt = prompt
        self.settings = settings or predictor.settings
        self.token_spans = token_spans
        self.targets = targets or {}
        self.json_writer = json_writer
        self.replace = replace
        self.next_image_id = 0
        self.errors: List[str] = []  # the messages of the last run() so far

    def predict(self, image_bgr: np.ndarray) -> Dict:
        """The predictor's output on one BGR image."""
        if self.settings.rec:
            return self.predictor.predict_rec(image_bgr, self.prompt, self.settings)
        if self.token_spans is not None:
            return self.predictor.predict_token_spans(
                image_bgr, self.prompt, self.token_spans, self.settings
            )
        return self.predictor(image_bgr, self.prompt, self.settings)

    def _record(self, output: Dict, path: str, frame: Optional[int] = None) -> None:
        if self.json_writer is not None:
            self.json_writer.extend(coco_results(output, self.next_image_id, path, frame))
        self.next_image_id += 1

    def _target(self, path: str) -> Optional[str]:
        target = self.targets.get(path)
        if target:
            if not self.replace and os.path.lexists(target):  # before the model runs
                raise FileExistsError(f"{target} exists; not replaced: pass --force to replace it")
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        return target

    def image(self, path: str) -> str:
        """Detects in an image file (drawn when it has a target). Returns a summary line."""
        target = self._target(path)
        image = read_bgr(path)
        output = self.predict(image)
        if target:
            ok, encoded = cv2.imencode(os.path.splitext(target)[1], draw(image, output)[:, :, ::-1])
            if not ok:
                raise ValueError(f"{target}: cannot encode the picture")
            write_bytes_atomic(target, encoded.tobytes(), replace=self.replace)
        self._record(output, path)
        phrases = ", ".join(dict.fromkeys(output["phrases"])) or "-"
        things = "masks" if output["instances"].has("pred_masks") else "boxes"
        return f"{path}: {len(output['instances'])} {things} ({phrases})"

    def video(self, path: str) -> str:
        """Detects in every frame of a video file (drawn to a video when it has a target).
        Returns a summary line."""
        fps, total = video_info(path)
        target = self._target(path)
        partial = temporary_path(target, os.path.splitext(target)[1]) if target else None
        writer, count, boxes = None, 0, 0
        try:
            for frame in tqdm(
                video_frames(path), total=total or None, desc=os.path.basename(path), leave=False
            ):
                output = self.predict(frame)
                self._record(output, path, count)
                boxes += len(output["instances"])
                if partial:
                    drawn = np.ascontiguousarray(draw(frame, output)[:, :, ::-1])
                    if writer is None:
                        height, width = drawn.shape[:2]
                        writer = open_video_writer(partial, fps, (width, height), name=target)
                    writer.write(drawn)
                count += 1
            if writer is not None:
                writer.release()
                writer = None
            if count == 0:
                raise ValueError(f"{path}: no frames could be read")
            if partial:
                publish(partial, target, replace=self.replace)
        finally:
            if writer is not None:
                writer.release()
            if partial and os.path.lexists(partial):
                os.remove(partial)
        return f"{path}: {count} frames, {boxes} boxes"

    def run(self, paths: Sequence[str]) -> List[str]:
        """
        Every file in order (videos by their ending), with a progress bar over the files; a
        summary line per file. A file that cannot be read, processed or written (any
        ``Exception``: a bad file, the model's ``RuntimeError``, out of memory) gets an
        ``ERROR`` line naming it, and the rest go on.

        Returns:
            the error messages, one per file that failed, each starting with the file.
        """
        errors = self.errors = []  # also read after an interruption
        for path in tqdm(paths, desc="images", unit="file", disable=len(paths) < 2):
            try:
                tqdm.write(self.video(path) if is_video(path) else self.image(path))
            except Exception as error:  # noqa: BLE001 (one file never stops the run)
                reason = str(error)
                if not isinstance(error, (OSError, ValueError)):
                    reason = f"{type(error).__name__}: {reason}"
                message = reason if reason.startswith(path) else f"{path}: {reason}"
                report_error(message)
                errors.append(message)
        return errors
