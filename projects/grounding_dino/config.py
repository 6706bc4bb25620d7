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
* ``MODEL.META_ARCHITECTURE`` is ``GroundingDINO`` (the registered meta-architecture;
  ``GroundingDINOFromYacs``, the name earlier yamls use, is the same model). Its
  ``from_config`` (detectron2's ``@configurable``) calls :func:`yacs_model_kwargs`, which
  instantiates the lazy config's ``model`` arguments and adds what ``DefaultPredictor`` cannot
  pass: the default prompt and the official test resize.
* ``INPUT.MIN_SIZE_TEST`` is 0, which turns ``DefaultPredictor``'s ``ResizeShortestEdge`` off
  (it rounds sizes differently from the official rule). The model resizes each
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
from typing import Dict, Optional

from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager
from detectron2.utils.registry import locate
from torch import nn

from .checkpoint import verify_checkpoint
from .config_overrides import apply_overrides
from .packaged_configs import configs_dir
from .preprocessing import Prompt, prompt_to_input
from .resize import official_resize_from_lazy_config

__all__ = [
    "add_grounding_dino_config",
    "resolve_config_file",
    "load_lazy_config_from_yacs",
    "default_prompt_from_yacs",
    "yacs_model_kwargs",
]

logger = logging.getLogger(__name__)


def add_grounding_dino_config(cfg: CN) -> None:
    """
    Adds ``MODEL.GROUNDING_DINO`` to a detectron2 yacs config, and sets the defaults the
    bridge needs (``MODEL.META_ARCHITECTURE = "GroundingDINO"``, ``INPUT.FORMAT =
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
    cfg.MODEL.META_ARCHITECTURE = "GroundingDINO"
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
    lazy = apply_overrides(lazy, overrides)
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


def _verify_weights(kwargs: Dict, path: str) -> None:
    """
    Reads ``MODEL.WEIGHTS`` safely (a file holding code fails before detectron2 opens it) and
    checks that it matches the model the keyword arguments build exactly (see
    :func:`~grounding_dino.checkpoint.verify_checkpoint`). The model's state is its
    components' states (it has no parameters of its own), so they are checked before it is
    built.
    """
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.WEIGHTS={path} does not exist")
    components = nn.Module()
    for name, value in kwargs.items():
        if isinstance(value, nn.Module):
            components.add_module(name, value)
    verify_checkpoint(components, local)


def yacs_model_kwargs(cfg: CN, model_class: type) -> Dict:
    """
    Keyword arguments of ``model_class`` (``GroundingDINO``) for a yacs config: the lazy
    config's ``model`` arguments instantiated, with ``input_format`` (``INPUT.FORMAT``),
    ``default_prompt`` and ``test_resize``. This is ``GroundingDINO.from_config``.

    ``MODEL.WEIGHTS`` is checked here, before ``DefaultPredictor`` loads it: it must match the
    model exactly, else :class:`~grounding_dino.checkpoint.CheckpointMismatchError` names the
    missing, unexpected and wrong-shape keys. An empty ``MODEL.WEIGHTS`` builds the model with
    its own initialisation (as detectron2's ``build_model`` and ``DefaultPredictor``), with a
    warning that its predictions come from random weights.

    Raises:
        ValueError: the lazy model is not a ``model_class``, the prompt is invalid, or
            ``MODEL.WEIGHTS`` is a ``.pkl`` / ``.safetensors`` file.
    """
    _check_weights_name(cfg.MODEL.WEIGHTS)
    default_prompt = default_prompt_from_yacs(cfg)
    lazy = load_lazy_config_from_yacs(cfg)
    target = lazy.model.get("_target_")
    if isinstance(target, str):
        target = locate(target)
    if not (isinstance(target, type) and issubclass(model_class, target)):
        raise ValueError(
            f"{cfg.MODEL.GROUNDING_DINO.CONFIG_FILE}: model._target_ is {target!r}; the yacs "
            f"bridge builds {model_class.__name__} from the arguments of a GroundingDINO"
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
    if cfg.MODEL.WEIGHTS:
        _verify_weights(kwargs, cfg.MODEL.WEIGHTS)
    else:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model is built with random weights, so its predictions "
            "(DefaultPredictor's included) come from random weights and mean nothing. Set "
            "MODEL.WEIGHTS to a checkpoint written by python -m grounding_dino.convert"
        )
    kwargs.update(
        input_format=cfg.INPUT.FORMAT,
        default_prompt=default_prompt,
        test_resize=official_resize_from_lazy_config(lazy),
    )
    return kwargs
