"""``GroundingDINOPredictor``: the model for scripts, from a lazy config and a checkpoint."""

import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Instances
from omegaconf import OmegaConf
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .checkpoint import GroundingDINOCheckpointer
from .precision import check_precision, outputs_to_fp32, precision_context
from .resize import official_resize_from_lazy_config
from .text import normalize_caption_with_spans

__all__ = [
    "GroundingDINOPredictor",
    "inference_knobs",
    "prompt_to_input",
    "model_input",
    "prompts_for_images",
    "check_image",
    "check_token_spans",
]

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[str]]


def prompt_to_input(prompt: Prompt) -> Dict:
    """A caption (str) or class names (list of str) -> the model's prompt field."""
    if prompt is None:
        raise ValueError("The prompt is None; give a caption or a list of class names")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("The prompt is empty or blank")
        return {"caption": prompt}
    names = list(prompt)
    if not names:
        raise ValueError("The class list is empty")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Class name {index} is empty or not a string: {name!r}")
    return {"category_names": names}


def check_image(image, min_size: int = 32, name: str = "image") -> np.ndarray:
    """
    Validates an HxWx3 uint8 image array.

    Raises:
        ValueError: for None, non-arrays, grayscale, RGBA, float images and images smaller
            than ``min_size`` pixels on a side.
    """
    if image is None:
        raise ValueError(f"{name} is None")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (H, W, 3), got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f"{name} is grayscale {image.shape}; convert it to 3 channels")
    if image.ndim != 3 or image.shape[2] != 3:
        what = "RGBA" if image.ndim == 3 and image.shape[2] == 4 else "not HxWx3"
        raise ValueError(f"{name} has shape {image.shape} ({what}); expected (H, W, 3)")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {image.dtype}; expected uint8 in [0, 255]")
    if min(image.shape[:2]) < min_size:
        raise ValueError(
            f"{name} is {image.shape[0]}x{image.shape[1]}, smaller than the "
            f"backbone's stride {min_size}"
        )
    return image


def model_input(
    image: np.ndarray,
    prompt: Prompt,
    index: int,
    *,
    resize,
    stride: int,
    input_format: str,
    model_input_format: str,
) -> Dict:
    """
    One model input from an image array and a prompt (shared by the PyTorch and the ONNX
    Runtime predictors).

    Args:
        image: HxWx3 uint8 array in ``input_format`` ("BGR" or "RGB").
        prompt: a caption or a list of class names.
        index: the image's index (named in errors).
        resize: the test-time resize (``OfficialResize``).
        stride: the backbone's size divisibility (smaller images are refused).
        model_input_format: the channel order the model expects.

    Returns:
        ``{"image": [3, h, w] uint8 tensor (resized), "height": H, "width": W, "caption" or
        "category_names": ...}``.
    """
    image = check_image(image, stride, name=f"image {index}")
    if input_format != model_input_format:
        image = image[:, :, ::-1]
    height, width = image.shape[:2]
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width, **prompt_to_input(prompt)}


def prompts_for_images(
    images: Sequence[np.ndarray], prompts: Union[Prompt, Sequence[Prompt]]
) -> Tuple[List[np.ndarray], List[Prompt]]:
    """
    The images of a batch call and one prompt per image: ``prompts`` is a list with one
    prompt (caption or class list) per image, or a single caption for all images (shared by
    the PyTorch and the ONNX Runtime predictors).

    Raises:
        ValueError: the numbers of images and prompts differ.
    """
    images = list(images)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images, prompts


def check_token_spans(caption: str, token_spans) -> List[List[List[int]]]:
    """
    Validates official-style token spans: one entry per phrase, each a list of ``[beg, end)``
    character spans in ``caption``, e.g. ``[[[0, 3]], [[4, 8], [10, 12]]]``.

    Returns:
        the spans as lists of ``[int, int]``.

    Raises:
        ValueError: naming the phrase and span that is malformed or outside the caption.
    """
    if not isinstance(token_spans, (list, tuple)) or not token_spans:
        raise ValueError(f"token spans must be a non-empty list of phrases, got {token_spans!r}")
    result = []
    for index, phrase in enumerate(token_spans):
        if not isinstance(phrase, (list, tuple)) or not phrase:
            raise ValueError(
                f"token spans: phrase {index} must be a non-empty list of "
                f"[beg, end] spans, got {phrase!r}"
            )
        spans = []
        for span in phrase:
            if (
                not isinstance(span, (list, tuple))
                or len(span) != 2
                or not all(isinstance(v, (int, np.integer)) for v in span)
            ):
                raise ValueError(f"token spans: phrase {index}: {span!r} is not [beg, end]")
            beg, end = int(span[0]), int(span[1])
            if not 0 <= beg < end <= len(caption):
                raise ValueError(
                    f"token spans: phrase {index}: span [{beg}, {end}) is empty or "
                    f"outside the caption of {len(caption)} characters"
                )
            spans.append([beg, end])
        result.append(spans)
    return result


@contextlib.contextmanager
def inference_knobs(model: torch.nn.Module, **values):
    """
    Temporarily sets inference attributes of a Grounding DINO (``box_threshold``,
    ``text_threshold``, ``max_detections``), restoring them afterwards, also when the body
    raises. A (Distributed)DataParallel wrapper is looked through.

    Raises:
        AttributeError: the model has no such attribute (nothing is set).
    """
    if isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    unknown = [name for name in values if not hasattr(model, name)]
    if unknown:
        raise AttributeError(f"{type(model).__name__} has no inference attribute(s) {unknown}")
    saved = {name: getattr(model, name) for name in values}
    try:
        for name, value in values.items():
            setattr(model, name, value)
        yield model
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


class GroundingDINOPredictor:
    """
    Runs a Grounding DINO on BGR images (as read by ``cv2.imread``) with a text prompt.

    Example::

        predictor = GroundingDINOPredictor.from_config_file(
            "configs/grounding_dino_swin_t_ogc.py", weights="model.pth")
        out = predictor(image_bgr, "cat . remote control .")   # or ["cat", "remote control"]
        out["instances"].pred_boxes, out["phrases"]
    """

    def __init__(
        self,
        cfg,
        weights: Optional[str] = None,
        input_format: str = "BGR",
        dtype: str = "fp32",
    ):
        """
        Args:
            cfg: a lazy config with ``model`` and ``train.device`` entries (and
                ``train.init_checkpoint`` when ``weights`` is None).
            weights: checkpoint to load (detectron2 format, e.g. from grounding_dino.convert);
                None: ``cfg.train.init_checkpoint``. It must match the model exactly (same
                keys and shapes), else :class:`~grounding_dino.checkpoint.CheckpointMismatchError`
                names the keys.
            input_format: channel order of the arrays given to ``__call__``.
            dtype: precision mode (:mod:`grounding_dino.precision`): "fp32", "bf16" (autocast,
                CPU or CUDA) or "fp16" (autocast, CUDA only). Outputs are float32 in every mode.

        Raises:
            ValueError: no weights are given (a randomly initialised model is refused), or
                ``dtype`` is unknown or not offered on the config's device (fp16 on the CPU).
        """
        self.cfg = cfg
        if weights is None:
            weights = _required(cfg, "train.init_checkpoint")
        if not weights:
            raise ValueError(
                "GroundingDINOPredictor: no weights (weights= is empty and so is the config's "
                "train.init_checkpoint); the model would predict with its random "
                "initialisation. Pass a checkpoint, e.g. one written by grounding_dino.convert"
            )
        device = _config_device(cfg)
        self.dtype = check_precision(dtype, device)
        self.model = instantiate(cfg.model)
        self.model.to(device).eval()
        GroundingDINOCheckpointer(self.model).load(weights)
        self.input_format = input_format
        self.resize = official_resize_from_lazy_config(cfg)

    @classmethod
    def from_config_file(
        cls, path: str, weights: Optional[str] = None, overrides: Sequence[str] = (), **kwargs
    ) -> "GroundingDINOPredictor":
        """Loads a lazy config (``.py``/``.yaml``) and applies ``key=value`` overrides;
        ``kwargs`` (``input_format``, ``dtype``) go to the constructor."""
        cfg = LazyConfig.load(path)
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
        return cls(cfg, weights=weights, **kwargs)

    def _input(self, image: np.ndarray, prompt: Prompt, index: int) -> Dict:
        return model_input(
            image,
            prompt,
            index,
            resize=self.resize,
            stride=self.model.backbone.size_divisibility,
            input_format=self.input_format,
            model_input_format=self.model.input_format,
        )

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: Prompt) -> Dict:
        """
        Args:
            image: HxWx3 uint8 array in ``input_format`` (BGR by default).
            prompt: a caption ("cat . remote control .") or a list of class names.

        Returns:
            ``{"instances": Instances, "phrases": [str]}`` in the image's pixels.
        """
        inputs = [self._input(image, prompt, 0)]
        with precision_context(self.dtype, self.model.device):
            return outputs_to_fp32(self.model(inputs)[0])

    @torch.no_grad()
    def predict_batch(
        self, images: Sequence[np.ndarray], prompts: Union[Prompt, Sequence[Prompt]]
    ) -> List[Dict]:
        """
        One forward for several images, each with its own prompt. ``prompts`` is a list with
        one prompt (caption or class list) per image, or a single caption for all images.
        Results equal one-by-one calls.
        """
        images, prompts = prompts_for_images(images, prompts)
        inputs = [self._input(im, p, i) for i, (im, p) in enumerate(zip(images, prompts))]
        with precision_context(self.dtype, self.model.device):
            return outputs_to_fp32(self.model(inputs))

    @torch.no_grad()
    def predict_rec(self, image: np.ndarray, expression: str) -> Dict:
        """
        Referring expression comprehension: the single best box for ``expression``, whatever
        its score (the box the REC evaluator scores as top-1).

        Returns:
            ``{"instances": Instances with exactly one box, "phrases": [expression]}``.
        """
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError(
                f"The referring expression must be a non-empty string, " f"got {expression!r}"
            )
        with inference_knobs(self.model, box_threshold=-1.0, max_detections=1):
            output = self(image, expression)
        output["phrases"] = [expression.strip()] * len(output["instances"])
        return output

    @torch.no_grad()
    def predict_token_spans(self, image: np.ndarray, caption: str, token_spans) -> Dict:
        """
        Grounds selected phrases of a caption, like the official ``--token_spans``: each
        phrase is a list of character spans; its score for a box is the box's token scores
        averaged over the phrase's tokens (``positive_map @ probs``); boxes above the box
        threshold are kept, one row per (box, phrase).

        Args:
            image: HxWx3 uint8 array in ``input_format``.
            caption: the caption the spans index into.
            token_spans: e.g. ``[[[0, 3]], [[4, 8]]]`` (phrase 0 = caption[0:3], ...).

        Returns:
            ``{"instances": Instances(pred_boxes, scores, pred_classes = phrase index,
            token_scores), "phrases": [the phrase's text] * N}``, best score first.
        """
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"The caption must be a non-empty string, got {caption!r}")
        token_spans = check_token_spans(caption, token_spans)
        normalized, spans = normalize_caption_with_spans(caption, token_spans)
        prompt_encoder = self.model.prompt_encoder
        encoding = prompt_encoder.tokenize(normalized)
        limit = prompt_encoder.max_text_len
        if len(encoding["input_ids"]) > limit:
            raise ValueError(
                f"token spans need the caption in one pass: it has "
                f"{len(encoding['input_ids'])} tokens, more than {limit}"
            )
        positive_map = prompt_encoder.positive_map(normalized, spans, encoding)  # [P, limit]
        threshold, max_detections = self.model.box_threshold, self.model.max_detections
        # Phrase scores never exceed the best token score, so the caption's boxes above the
        # threshold include every (box, phrase) pair above it.
        with inference_knobs(self.model, max_detections=self.model.query_selector.num_queries):
            output = self(image, normalized)
        instances = output["instances"]
        token_scores = instances.token_scores
        phrase_scores = token_scores @ positive_map[:, : token_scores.shape[1]].to(token_scores).T
        box_index, phrase_index = (phrase_scores > threshold).nonzero(as_tuple=True)
        scores = phrase_scores[box_index, phrase_index]
        order = scores.argsort(descending=True, stable=True)[:max_detections]
        box_index, phrase_index = box_index[order], phrase_index[order]
        result = Instances(instances.image_size)
        result.pred_boxes = instances.pred_boxes[box_index]
        result.scores = scores[order]
        result.pred_classes = phrase_index
        result.token_scores = token_scores[box_index]
        texts = [" ".join(caption[beg:end] for beg, end in phrase) for phrase in token_spans]
        return {"instances": result, "phrases": [texts[int(i)] for i in phrase_index]}


_MISSING = object()


def _required(cfg, key: str):
    """``cfg``'s value at the dotted ``key``; an error naming the key when the config lacks it."""
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        raise KeyError(f"The config has no {key}; set it (e.g. as an override {key}=...)")
    return value


def _config_device(cfg) -> str:
    device = _required(cfg, "train.device")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available; using the CPU", device)
        return "cpu"
    return device
