"""The Gradio app of the web demo (``demo/web.py``): one image and a prompt in, boxes (and,
with a mask stage, masks) and a table out.

``Detector`` does the work of one request (checks, model, NMS, masks, drawing) and turns every
bad input into a message (:class:`gradio.Error`, shown in the page and raised by
``gradio_client`` as ``AppError``), never a stack trace. The upload reaches it undecoded
(:func:`image_upload`) and its size is checked from the header before it is decoded. The
drawing is answered as a PNG file of its own (:class:`ResultFiles`). ``build_app`` lays out the
page; requests are queued and the model runs one request at a time
(``queue(default_concurrency_limit=1)``).
"""

import atexit
import collections
import itertools
import logging
import os
import shutil
import tempfile
import threading
from typing import List, Optional, Sequence, Tuple

import cv2
import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder

from ..io.atomic import write_bytes_atomic
from ..io.coco_files import instance_segmentations
from ..io.images import ImageReadError, read_bgr
from ..predictor import GroundingDINOPredictor
from ..preprocessing import parse_prompt
from ..segment import MaskStage, add_instances_masks
from ..visualization import draw

__all__ = [
    "TABLE_HEADERS",
    "Detector",
    "ResultFiles",
    "image_upload",
    "build_app",
    "table_rows",
]

logger = logging.getLogger(__name__)

TABLE_HEADERS = ["phrase", "score", "x0", "y0", "x1", "y1"]


def _uploaded_path(payload) -> Optional[str]:
    """The path of the uploaded file, untouched."""
    if payload is None:
        return None
    if payload.path is None:  # a base64 "data:" URL: Gradio would decode it
        raise gr.Error("Send the image as a file upload (not inline data).")
    return str(payload.path)


def image_upload(**kwargs) -> gr.Image:
    """
    A ``gr.Image`` input (the same widget in the page) whose upload reaches the handler as the
    path of the uploaded file, undecoded: Gradio's own ``gr.Image(type="filepath")`` opens it
    with PIL and converts any non-RGB image (grayscale, palette, RGBA) in memory before the
    handler can check its size, so a small PNG of 20000x20000 gray pixels would allocate
    gigabytes.

    Args:
        kwargs: ``gr.Image``'s (``label``, ``elem_id``...).
    """
    component = gr.Image(type="filepath", **kwargs)
    # This instance's, not the class's: a subclass of a Gradio component makes Gradio write a
    # .pyi file next to the module that defines it.
    component.preprocess = _uploaded_path
    return component


def table_rows(output) -> List[list]:
    """One row per box: phrase, score (3 decimals), xyxy box in pixels (1 decimal)."""
    instances = output["instances"].to("cpu")
    rows = []
    for phrase, score, box in zip(
        output["phrases"], instances.scores.tolist(), instances.pred_boxes.tensor.tolist()
    ):
        rows.append([phrase, round(score, 3), *(round(v, 1) for v in box)])
    return rows


class ResultFiles:
    """
    The drawn images the server answers with: one PNG per request under a name of its own, in a
    folder this server owns, of which the last ``keep`` are kept (older ones are removed).

    Why not a numpy array: Gradio writes an answered array to ``<cache>/<content hash>/image.png``
    with a truncating write, so two requests with the same drawing rewrite the file one client
    is downloading (``httpx.RemoteProtocolError: peer closed connection without sending complete
    message body``). A file answered by path inside Gradio's upload folder is served as it is,
    not copied; each is written in one step (:func:`~grounding_dino.io.atomic.write_bytes_atomic`)
    and never rewritten.

    Args:
        keep: how many of the latest drawings stay downloadable (at least 1): a client fetches
            its drawing right after its answer, so this only needs to exceed the requests that
            can finish meanwhile.
        folder: where the files go (created; removed when the process exits); None: a new
            folder in Gradio's upload folder (``GRADIO_TEMP_DIR``, by default
            ``<tmp>/gradio``).
    """

    def __init__(self, keep: int = 64, folder: Optional[str] = None):
        if keep < 1:
            raise ValueError(f"ResultFiles keeps at least 1 drawing, got keep={keep}")
        if folder is None:
            os.makedirs(get_upload_folder(), exist_ok=True)
            folder = tempfile.mkdtemp(prefix="grounding_dino-results-", dir=get_upload_folder())
        else:
            os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.keep = keep
        self._written = collections.deque()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, folder, ignore_errors=True)

    def write(self, drawn_rgb: np.ndarray) -> str:
        """Writes ``drawn_rgb`` (HxWx3 uint8 RGB) as a new PNG; returns its path."""
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(drawn_rgb[:, :, ::-1]))
        if not ok:
            raise ValueError("cannot encode the drawing as PNG")
        with self._lock:
            path = os.path.join(self.folder, f"result-{next(self._numbers):08d}.png")
        write_bytes_atomic(path, encoded.tobytes(), replace=False)
        with self._lock:
            self._written.append(path)
            old = [self._written.popleft() for _ in range(len(self._written) - self.keep)]
        for stale in old:
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass
        return path


class Detector:
    """
    Runs the predictor (and the mask stage, when there is one and the request asks for masks)
    on one uploaded image with the page's settings.

    Args:
        predictor: the model.
        max_pixels: larger images (width x height) are refused with a message.
        mask_stage: the box-prompted segmenter (``--sam``), or None: a request for masks is
            then refused with a message.
        results: where the drawings go (None: a new :class:`ResultFiles`).
    """

    def __init__(
        self,
        *,
        predictor: GroundingDINOPredictor,
        max_pixels: int,
        mask_stage: Optional[MaskStage] = None,
        results: Optional[ResultFiles] = None,
    ):
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.min_size = predictor.model.backbone.size_divisibility
        self.mask_stage = mask_stage
        self.results = results or ResultFiles()

    def _read(self, path: Optional[str]) -> np.ndarray:
        """The upload as a BGR array through the project's one image reader: its size is checked
        from the header (``max_pixels``, the backbone's stride) before any pixel is decoded."""
        if not path:
            raise gr.Error("No image: upload one (or click an example) first.")
        try:
            return read_bgr(path, max_pixels=self.max_pixels, min_size=self.min_size)
        except ImageReadError as error:  # the reader names the reason; the path is Gradio's own
            logger.warning("refused an upload: %s", error)
            raise gr.Error(
                f"The upload cannot be used: {error.reason} (this server's limit: "
                f"{self.max_pixels / 1e6:.1f} megapixels, --max-pixels)."
            ) from None

    def __call__(
        self,
        image_path: Optional[str],
        prompt: Optional[str],
        box_threshold: float,
        text_threshold: float,
        rec: bool,
        nms: float,
        masks: bool = False,
    ) -> Tuple[str, List[list], str, List[dict]]:
        """
        Args:
            image_path: the uploaded file (Gradio's ``type="filepath"``).
            prompt: a caption ("red square . blue circle .") or comma-separated class names;
                the referring expression when ``rec``.
            box_threshold, text_threshold: the model's thresholds in [0, 1].
            rec: referring expression mode: exactly one box, the best one.
            nms: class-wise NMS IoU threshold in [0, 1]; 0 turns it off.
            masks: also segment every box with the mask stage (refused without one).

        Returns:
            the path of the drawing (a PNG of this request's own), the table rows
            (:data:`TABLE_HEADERS`), a status line, and the masks: one COCO RLE per row
            (``{"size": [H, W], "counts": str}``, pycocotools' ``mask.decode`` reads it), or
            an empty list without ``masks``.
        """
        prompt = (prompt or "").strip()
        if masks and self.mask_stage is None:
            raise gr.Error(
                "This server has no segmenter, so it cannot give masks: untick Masks, or start "
                "demo/web.py with --sam DIR (a transformers SAM, SAM-HQ or SAM 2 folder)."
            )
        image = self._read(image_path)
        if not prompt:
            raise gr.Error(
                'The prompt is empty: type a caption ("red square . blue circle .") or class '
                'names separated by commas ("red square, blue circle").'
            )
        for name, value in [
            ("box threshold", box_threshold),
            ("text threshold", text_threshold),
            ("NMS IoU", nms),
        ]:
            if value is None or not 0 <= float(value) <= 1:
                raise gr.Error(f"The {name} must be a number in [0, 1], got {value!r}.")
        try:
            parsed = parse_prompt(prompt, split_commas=not rec)
            settings = self.predictor.settings.replace(
                box_threshold=float(box_threshold),
                text_threshold=float(text_threshold),
                nms_threshold=float(nms),
            )
            if rec:
                output = self.predictor.predict_rec(image, parsed, settings)
            else:
                output = self.predictor(image, parsed, settings)
            if masks:
                rgb = np.ascontiguousarray(image[:, :, ::-1])
                add_instances_masks(output["instances"], rgb, self.mask_stage)
            rows = table_rows(output)
            rles = instance_segmentations(output["instances"].to("cpu")) or []
            drawn = self.results.write(draw(image, output))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # the message only; the traceback goes to the server's log
            logger.exception("request failed")
            raise gr.Error(
                f"The model failed on this request: {type(error).__name__}: {error}"
            ) from None
        phrases = ", ".join(dict.fromkeys(output["phrases"])) or "none"
        status = f"{len(rows)} boxes ({phrases}) on a {image.shape[1]}x{image.shape[0]} image"
        status += ", a mask each." if masks else "."
        return drawn, rows, status, rles


def build_app(
    detector: Detector,
    *,
    title: str,
    box_threshold: float,
    text_threshold: float,
    nms: float,
    examples: Sequence[Tuple[str, str]] = (),
) -> gr.Blocks:
    """
    The page: image, prompt and settings on the left, the drawn image, a status line, the
    table and the masks (RLE) on the right. The API endpoint is ``/detect`` (same inputs and
    outputs as :class:`Detector`; ``masks`` may be left out: False).

    Args:
        detector: the request handler.
        title: shown at the top (the model's config and weights).
        box_threshold, text_threshold, nms: the sliders' initial values.
        examples: (image path, prompt) pairs shown under the inputs.
    """
    with gr.Blocks(title="Grounding DINO", analytics_enabled=False) as app:
        gr.Markdown(f"# Grounding DINO: open-set detection\n{title}")
        with gr.Row():
            with gr.Column():
                image = image_upload(label="Image", elem_id="input-image")
                prompt = gr.Textbox(
                    label="Prompt: a caption, or class names separated by commas",
                    placeholder="red square . blue circle .   or   red square, blue circle",
                    elem_id="prompt",
                )
                with gr.Row():
                    box = gr.Slider(0, 1, value=box_threshold, step=0.01, label="Box threshold")
                    text = gr.Slider(0, 1, value=text_threshold, step=0.01, label="Text threshold")
                with gr.Row():
                    nms_iou = gr.Slider(0, 1, value=nms, step=0.05, label="NMS IoU (0: off)")
                    rec = gr.Checkbox(label="Referring expression (one box)", value=False)
                has_sam = detector.mask_stage is not None
                masks = gr.Checkbox(
                    label="Masks (a box-prompted segmenter turns every box into a mask)",
                    info=None if has_sam else "off: the server was started without --sam DIR",
                    value=False,  # also the API's default: masks are asked for
                    interactive=has_sam,
                    elem_id="masks-switch",
                )
                submit = gr.Button("Detect", variant="primary", elem_id="detect")
                if examples:
                    gr.Examples(examples=[list(e) for e in examples], inputs=[image, prompt])
            with gr.Column():
                result = gr.Image(
                    type="filepath", format="png", label="Detections", elem_id="result-image"
                )
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(
                    headers=TABLE_HEADERS,
                    datatype=["str", "number", "number", "number", "number", "number"],
                    label="Boxes (pixels, x0 y0 x1 y1)",
                    interactive=False,
                    elem_id="boxes",
                )
                with gr.Accordion("Masks (COCO RLE, one per row)", open=False):
                    rles = gr.JSON(label="Masks", elem_id="masks")
        inputs = [image, prompt, box, text, rec, nms_iou, masks]
        outputs = [result, table, status, rles]
        submit.click(detector, inputs, outputs, api_name="detect")
        prompt.submit(detector, inputs, outputs, api_visibility="private")
    return app
