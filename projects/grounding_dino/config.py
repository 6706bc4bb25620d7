"""The yacs bridge: detectron2's ``DefaultPredictor`` (and ``build_model(cfg)``) on a thin yacs
config that names the lazy config holding the model structure.

Example::

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from grounding_dino import add_grounding_dino_config

    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.merge_from_file("configs/grounding_dino_swin_t_ogc.yaml")
    cfg.MODEL.WEIGHTS = "model.pth"
    cfg.MODEL.GROUNDING_DINO.PROMPT = "cat . remote control ."  # or ["cat", "remote control"]
    outputs = DefaultPredictor(cfg)(image_bgr)

How the results equal :class:`~grounding_dino.GroundingDINOPredictor`:

* The structure comes from the lazy config only (``MODEL.GROUNDING_DINO.CONFIG_FILE`` with
  ``MODEL.GROUNDING_DINO.OVERRIDES``); yacs keys such as ``MODEL.PIXEL_MEAN`` are not used.
* ``MODEL.META_ARCHITECTURE`` is ``GroundingDINOFromYacs``: a :class:`GroundingDINO` whose
  ``from_config`` instantiates the lazy config's ``model`` and whose ``inference`` first fills
  what ``DefaultPredictor`` cannot pass (the meta-architecture itself knows nothing of yacs).
* ``INPUT.MIN_SIZE_TEST`` is 0, which turns ``DefaultPredictor``'s ``ResizeShortestEdge`` off
  (it rounds sizes differently from the official rule). ``GroundingDINOFromYacs`` resizes each
  CPU image itself with :class:`~grounding_dino.resize.OfficialResize`, on the same uint8
  pixels and before anything moves to the device, exactly as ``GroundingDINOPredictor`` does.
* ``DefaultPredictor`` passes no prompt, so the model uses its ``default_prompt``:
  ``MODEL.GROUNDING_DINO.PROMPT``, else the ``thing_classes`` of ``DATASETS.TEST[0]``.
* ``DefaultPredictor`` loads ``MODEL.WEIGHTS`` with detectron2's checkpointer, which
  unpickles without ``weights_only`` and only logs missing, unexpected or wrong-shape keys.
  The model is built first: it reads the file with ``torch.load(weights_only=True)``, so a
  file holding code is refused (an error naming it) before detectron2 ever opens it, and
  checks that the weights match it exactly (same keys, same shapes), else
  :class:`~grounding_dino.checkpoint.CheckpointMismatchError` names the keys.
"""

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, configurable, instantiate
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.file_io import PathManager
from detectron2.utils.registry import locate

from .checkpoint import verify_checkpoint
from .model_zoo import configs_dir
from .modeling import GroundingDINO
from .predictor import prompt_to_input
from .resize import OfficialResize, official_resize_from_lazy_config

__all__ = [
    "GroundingDINOFromYacs",
    "add_grounding_dino_config",
    "resolve_config_file",
    "load_lazy_config_from_yacs",
    "default_prompt_from_yacs",
    "lazy_model_kwargs_from_yacs",
    "build_lazy_model_from_yacs",
]

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[str]]


def add_grounding_dino_config(cfg: CN) -> None:
    """
    Adds ``MODEL.GROUNDING_DINO`` to a detectron2 yacs config, and sets the defaults the
    bridge needs (``MODEL.META_ARCHITECTURE = "GroundingDINOFromYacs"``, ``INPUT.FORMAT =
    "RGB"``, ``INPUT.MIN_SIZE_TEST = 0``: see the module doc).

    Keys:
        CONFIG_FILE: the lazy config (``.py``, or the converter's ``config.yaml``). Relative
            paths are looked up from the working directory, then ``configs/...`` among the
            packaged configs (see :func:`resolve_config_file`).
        OVERRIDES: list of ``"key=value"`` overrides of the lazy config, e.g.
            ``["model.query_selector.num_queries=300"]`` (as on ``train_net.py``'s command
            line).
        PROMPT: the default prompt: a caption (str) or class names (list). None: the
            ``thing_classes`` of ``DATASETS.TEST[0]``.
        BOX_THRESHOLD, TEXT_THRESHOLD, MAX_DETECTIONS: None keeps the lazy config's
            ``model.box_threshold`` / ``text_threshold`` / ``max_detections``.
    """
    cfg.MODEL.GROUNDING_DINO = CN()
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = ""
    cfg.MODEL.GROUNDING_DINO.OVERRIDES = []
    cfg.MODEL.GROUNDING_DINO.PROMPT = None
    cfg.MODEL.GROUNDING_DINO.BOX_THRESHOLD = None
    cfg.MODEL.GROUNDING_DINO.TEXT_THRESHOLD = None
    cfg.MODEL.GROUNDING_DINO.MAX_DETECTIONS = None
    cfg.MODEL.META_ARCHITECTURE = "GroundingDINOFromYacs"
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 0


def resolve_config_file(path: str) -> str:
    """
    Finds ``MODEL.GROUNDING_DINO.CONFIG_FILE``: as given (absolute or from the working
    directory), else ``configs/<name>`` among the packaged configs (``model_zoo``), so the
    thin yamls work from any directory and from an installed package.

    Raises:
        ValueError: the key is empty. FileNotFoundError: no such file (names the places tried).
    """
    if not path:
        raise ValueError(
            "MODEL.GROUNDING_DINO.CONFIG_FILE is empty; name the lazy config, e.g. "
            "configs/grounding_dino_swin_t_ogc.py"
        )
    candidates = [Path(path)]
    if not os.path.isabs(path) and Path(path).parts[0] == "configs":
        candidates.append(configs_dir().joinpath(*Path(path).parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"MODEL.GROUNDING_DINO.CONFIG_FILE={path!r} not found (tried {tried})")


def load_lazy_config_from_yacs(cfg: CN):
    """
    The lazy config named by ``cfg``, with ``OVERRIDES`` and the non-None thresholds applied.

    Returns:
        the lazy config (``omegaconf.DictConfig``) with a ``model`` entry.
    """
    gd = cfg.MODEL.GROUNDING_DINO
    lazy = LazyConfig.load(resolve_config_file(gd.CONFIG_FILE))
    overrides = list(gd.OVERRIDES)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"MODEL.GROUNDING_DINO.OVERRIDES: {item!r} is not 'key=value'")
    lazy = LazyConfig.apply_overrides(lazy, overrides)
    if "model" not in lazy:
        raise ValueError(f"{gd.CONFIG_FILE} has no 'model' entry")
    for key, field in (
        ("BOX_THRESHOLD", "box_threshold"),
        ("TEXT_THRESHOLD", "text_threshold"),
        ("MAX_DETECTIONS", "max_detections"),
    ):
        value = gd[key]
        if value is not None:
            lazy.model[field] = value
    return lazy


def default_prompt_from_yacs(cfg: CN) -> Optional[Prompt]:
    """
    ``MODEL.GROUNDING_DINO.PROMPT``; when unset (None or empty), the ``thing_classes`` of
    ``DATASETS.TEST[0]``'s metadata; None when neither is available.

    Raises:
        ValueError: an invalid prompt (blank caption, empty class name).
    """
    prompt = cfg.MODEL.GROUNDING_DINO.PROMPT
    if prompt:
        if not isinstance(prompt, str):
            prompt = [str(name) for name in prompt]
        prompt_to_input(prompt)  # validates
        return prompt
    if len(cfg.DATASETS.TEST):
        name = cfg.DATASETS.TEST[0]
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            prompt_to_input(list(classes))
            logger.info(
                "No MODEL.GROUNDING_DINO.PROMPT: using the %d classes of %s", len(classes), name
            )
            return [str(c) for c in classes]
        logger.warning(
            "No MODEL.GROUNDING_DINO.PROMPT and dataset %s has no thing_classes; "
            "inputs must carry their own 'caption' or 'category_names'",
            name,
        )
    return None


def _capture_kwargs(**kwargs) -> Dict:
    return kwargs


def _check_weights_name(path: str) -> None:
    """Refuses ``MODEL.WEIGHTS`` formats that detectron2's checkpointer would mishandle."""
    if path.endswith(".pkl"):
        raise ValueError(
            f"MODEL.WEIGHTS={path}: pickled files are not supported; convert the "
            f"checkpoint with `python -m grounding_dino.convert`"
        )
    if path.endswith(".safetensors"):
        raise ValueError(
            f"MODEL.WEIGHTS={path}: DefaultPredictor's checkpointer cannot read "
            f"safetensors; convert it with `python -m grounding_dino.convert`"
        )


def _verify_weights(model: "GroundingDINOFromYacs", path: str) -> None:
    """
    Reads ``MODEL.WEIGHTS`` safely (a file holding code fails before detectron2 opens it) and
    checks that it matches ``model`` exactly (see
    :func:`~grounding_dino.checkpoint.verify_checkpoint`).
    """
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.WEIGHTS={path} does not exist")
    verify_checkpoint(model, local)


def lazy_model_kwargs_from_yacs(cfg: CN) -> Dict:
    """
    Keyword arguments of :class:`GroundingDINOFromYacs` for a yacs config: the lazy config's
    ``model`` entry instantiated, plus ``input_format`` (``INPUT.FORMAT``), ``default_prompt``,
    ``test_resize`` and ``weights`` (``MODEL.WEIGHTS``). This is
    ``GroundingDINOFromYacs.from_config``.

    Raises:
        ValueError: the lazy model is not a GroundingDINO, the prompt is invalid, or
            ``MODEL.WEIGHTS`` is a ``.pkl`` / ``.safetensors`` file.
    """
    _check_weights_name(cfg.MODEL.WEIGHTS)
    default_prompt = default_prompt_from_yacs(cfg)
    lazy = load_lazy_config_from_yacs(cfg)
    target = lazy.model.get("_target_")
    if isinstance(target, str):
        target = locate(target)
    if target is not GroundingDINO:
        raise ValueError(
            f"{cfg.MODEL.GROUNDING_DINO.CONFIG_FILE}: model._target_ is {target!r}; the yacs "
            "bridge builds GroundingDINOFromYacs from the arguments of a GroundingDINO"
        )
    model_cfg = lazy.model
    model_cfg._target_ = _capture_kwargs
    kwargs = instantiate(model_cfg)
    if cfg.INPUT.MIN_SIZE_TEST:
        logger.warning(
            "INPUT.MIN_SIZE_TEST=%s: DefaultPredictor resizes with detectron2's rounding before "
            "the model's official resize; set it to 0 for results equal to "
            "GroundingDINOPredictor",
            cfg.INPUT.MIN_SIZE_TEST,
        )
    kwargs.update(
        input_format=cfg.INPUT.FORMAT,
        default_prompt=default_prompt,
        test_resize=official_resize_from_lazy_config(lazy),
        weights=cfg.MODEL.WEIGHTS,
    )
    return kwargs


@META_ARCH_REGISTRY.register()
class GroundingDINOFromYacs(GroundingDINO):
    """
    :class:`GroundingDINO` for ``build_model(cfg)`` and ``DefaultPredictor`` (the thin yamls'
    ``MODEL.META_ARCHITECTURE``). Its parameters are GroundingDINO's (same checkpoints).

    At inference it first fills what ``DefaultPredictor`` cannot pass: inputs without
    ``"caption"`` or ``"category_names"`` get ``default_prompt``, and each image is resized
    with ``test_resize`` on the CPU, on uint8 pixels, before it moves to the device
    (``"height"`` / ``"width"`` default to the size before the resize).

    ``weights`` (``MODEL.WEIGHTS``) is checked when the model is built, before
    ``DefaultPredictor`` loads it: it must match the model exactly, else
    :class:`~grounding_dino.checkpoint.CheckpointMismatchError` names the missing,
    unexpected and wrong-shape keys. An empty ``MODEL.WEIGHTS`` builds the model with its
    own initialisation (as detectron2's ``build_model``), with a warning.
    """

    @configurable
    def __init__(
        self,
        *,
        default_prompt: Optional[Prompt],
        test_resize: Optional[OfficialResize],
        weights: str,
        **kwargs,
    ):
        """
        Args:
            default_prompt: caption (str) or class names (list of str) of inputs without a
                prompt; None: inputs must carry their own.
            test_resize: resize of inference images (None: used as given).
            weights: the checkpoint that will be loaded into the model (checked here, not
                loaded); "" for none.
            kwargs: the arguments of :class:`GroundingDINO`.
        """
        super().__init__(**kwargs)
        self.default_prompt = default_prompt
        self.test_resize = test_resize
        if weights:
            _verify_weights(self, weights)
        else:
            logger.warning(
                "MODEL.WEIGHTS is empty: GroundingDINOFromYacs keeps its own (random) "
                "initialisation; set MODEL.WEIGHTS to a converted checkpoint for predictions"
            )

    @classmethod
    def from_config(cls, cfg: CN) -> Dict:
        return lazy_model_kwargs_from_yacs(cfg)

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        return super().inference([self._with_defaults(r) for r in batched_inputs])

    def _with_defaults(self, record: Dict) -> Dict:
        record = dict(record)
        if (
            self.default_prompt is not None
            and "caption" not in record
            and "category_names" not in record
        ):
            record.update(prompt_to_input(self.default_prompt))
        image = record.get("image")
        if self.test_resize is not None and isinstance(image, torch.Tensor) and image.dim() == 3:
            if image.device.type != "cpu":
                raise ValueError(
                    f"GroundingDINOFromYacs resizes images on the CPU (the official PIL "
                    f"resize) before moving them to the model's device; got an image on "
                    f"{image.device}. Pass CPU tensors, as DefaultPredictor does."
                )
            record.setdefault("height", image.shape[-2])
            record.setdefault("width", image.shape[-1])
            record["image"] = _resize_image(image, self.test_resize)
        return record


def build_lazy_model_from_yacs(cfg: CN) -> GroundingDINOFromYacs:
    """
    The model a yacs config describes (what ``build_model(cfg)`` returns, without moving it
    to ``MODEL.DEVICE`` and without loading weights; a non-empty ``MODEL.WEIGHTS`` is checked
    against it).
    """
    return GroundingDINOFromYacs(cfg)


def _resize_image(image: torch.Tensor, augmentation) -> torch.Tensor:
    """
    Applies a detectron2 augmentation to a CPU [3, H, W] image with 0-255 values (uint8, or
    float as ``DefaultPredictor`` gives), on uint8 pixels as the dataset mappers and
    ``GroundingDINOPredictor`` do. Returns a uint8 [3, H', W'] tensor.
    """
    if image.dtype != torch.uint8:
        image = image.round().clamp(0, 255).to(torch.uint8)
    array = image.permute(1, 2, 0).numpy()
    resized = augmentation.get_transform(array).apply_image(array)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
