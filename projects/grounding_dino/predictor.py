"""``GroundingDINOPredictor``: the model for scripts, from a lazy config and a checkpoint."""
import logging
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate

from .checkpoint import GroundingDINOCheckpointer
from .resize import OfficialResize

__all__ = ["GroundingDINOPredictor", "prompt_to_input", "check_image"]

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
        raise ValueError(f"{name} is {image.shape[0]}x{image.shape[1]}, smaller than the "
                         f"backbone's stride {min_size}")
    return image


class GroundingDINOPredictor:
    """
    Runs a Grounding DINO on BGR images (as read by ``cv2.imread``) with a text prompt.

    Example::

        predictor = GroundingDINOPredictor.from_config_file(
            "configs/grounding_dino_swin_t_ogc.py", weights="model.pth")
        out = predictor(image_bgr, "cat . remote control .")   # or ["cat", "remote control"]
        out["instances"].pred_boxes, out["phrases"]
    """

    def __init__(self, cfg, weights: Optional[str] = None, input_format: str = "BGR"):
        """
        Args:
            cfg: a lazy config with a ``model`` entry (and optionally ``train.device``).
            weights: checkpoint to load (detectron2 format, e.g. from grounding_dino.convert);
                defaults to ``cfg.train.init_checkpoint`` when set.
            input_format: channel order of the arrays given to ``__call__``.
        """
        self.cfg = cfg
        self.model = instantiate(cfg.model)
        device = _config_device(cfg)
        self.model.to(device).eval()
        weights = weights or _select(cfg, "train.init_checkpoint")
        if weights:
            GroundingDINOCheckpointer(self.model).load(weights)
        self.input_format = input_format
        size = _select(cfg, "dataloader.test.mapper.min_size") or 800
        self.resize = OfficialResize(800 if not isinstance(size, int) else size, 1333)

    @classmethod
    def from_config_file(cls, path: str, weights: Optional[str] = None,
                         overrides: Sequence[str] = (), **kwargs) -> "GroundingDINOPredictor":
        """Loads a lazy config (``.py``/``.yaml``) and applies ``key=value`` overrides."""
        cfg = LazyConfig.load(path)
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
        return cls(cfg, weights=weights, **kwargs)

    def _input(self, image: np.ndarray, prompt: Prompt, index: int) -> Dict:
        stride = getattr(self.model.backbone, "size_divisibility", 32)
        image = check_image(image, stride, name=f"image {index}")
        if self.input_format != self.model.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width, **prompt_to_input(prompt)}

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: Prompt) -> Dict:
        """
        Args:
            image: HxWx3 uint8 array in ``input_format`` (BGR by default).
            prompt: a caption ("cat . remote control .") or a list of class names.

        Returns:
            ``{"instances": Instances, "phrases": [str]}`` in the image's pixels.
        """
        return self.model([self._input(image, prompt, 0)])[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray],
                      prompts: Union[Prompt, Sequence[Prompt]]) -> List[Dict]:
        """
        One forward for several images, each with its own prompt. ``prompts`` is a list with
        one prompt (caption or class list) per image, or a single caption for all images.
        Results equal one-by-one calls.
        """
        images = list(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        inputs = [self._input(im, p, i) for i, (im, p) in enumerate(zip(images, prompts))]
        return self.model(inputs)


def _select(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return None
    return node


def _config_device(cfg) -> str:
    device = _select(cfg, "train.device") or "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available; using the CPU", device)
        return "cpu"
    return device
