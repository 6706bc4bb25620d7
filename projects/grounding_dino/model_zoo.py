"""The one loader: a config (packaged name, file, or loaded) and its weights -> a model, as
detectron2's ``model_zoo``; and the command-line arguments that choose them.

Example::

    from grounding_dino import model_zoo

    cfg = model_zoo.get_config("grounding_dino_swin_t_ogc.py")      # a LazyConfig
    model = model_zoo.get("grounding_dino_swin_t_ogc.py", weights="model.pth", device="cpu")

    parser = argparse.ArgumentParser()
    model_zoo.add_model_arguments(parser)   # --config-file --weights --opts --device --dtype
    args = parser.parse_args()
    config = model_zoo.load_config(args.config_file, args.opts, args.weights)

Config names are paths relative to the package's ``configs/`` folder (see
:mod:`grounding_dino.packaged_configs`); anything else is a file path. Every entry point (the
predictors, the labeller, the demos, the exporter, ``train_net.py``, the tools and the test
fixtures) loads through here.
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import yaml
from detectron2.config import LazyConfig, get_cfg, instantiate
from omegaconf import OmegaConf

from .checkpoint import GroundingDINOCheckpointer
from .config import add_grounding_dino_config, default_prompt_from_yacs, load_lazy_config_from_yacs
from .config_overrides import apply_overrides
from .devices import AUTO_DEVICE, resolve_device
from .packaged_configs import configs_dir, get_config_file, list_configs
from .precision import add_dtype_argument

__all__ = [
    "configs_dir",
    "list_configs",
    "get_config_file",
    "get_config",
    "ModelConfig",
    "load_config",
    "resolve_device",
    "AUTO_DEVICE",
    "build_model",
    "get",
    "add_model_arguments",
]

logger = logging.getLogger(__name__)

_MISSING = object()


def _config_path(name_or_path: str) -> str:
    """A file path as given when it exists, else a packaged config's name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    return get_config_file(name_or_path)


def get_config(name_or_path: str, overrides: Sequence[str] = ()):
    """
    Loads a lazy config (``.py``, or the converter's ``config.yaml``) with ``key=value``
    overrides.

    Args:
        name_or_path: a file path, or a packaged config's name (``"shapes_tiny.py"``).
        overrides: e.g. ``["model.box_threshold=0.3"]`` (as on ``train_net.py``'s command line).

    Raises:
        FileNotFoundError: neither a file nor a packaged config (the message lists them).
        ValueError: a thin yacs ``.yaml`` (load it with :func:`load_config`).
    """
    path = _config_path(name_or_path)
    if _is_yacs_file(path):
        raise ValueError(
            f"{name_or_path} is a thin yacs config (MODEL: ...), not a lazy config; load it "
            f"with grounding_dino.model_zoo.load_config, or use detectron2's get_cfg() after "
            f"add_grounding_dino_config(cfg)"
        )
    return _load_lazy(path, overrides)


def _load_lazy(path: str, overrides: Sequence[str]):
    return apply_overrides(LazyConfig.load(path), list(overrides))


@dataclass
class ModelConfig:
    """
    What a command line's ``--config-file``, ``--opts`` and ``--weights`` describe.

    Attributes:
        lazy: the lazy config (``model`` and, for the test resize, ``dataloader.test``).
        weights: the checkpoint to load (``--weights``, else the config's
            ``train.init_checkpoint`` / ``MODEL.WEIGHTS``; None when none is named).
        device: the device the config asks for (``MODEL.DEVICE`` when a yacs config or its
            overrides set it), or None.
        default_prompt: the default prompt of a thin yacs config (None for lazy configs).
    """

    lazy: object
    weights: Optional[str]
    device: Optional[str] = None
    default_prompt: Optional[object] = None


def _is_yacs_file(path: str) -> bool:
    if not path.endswith((".yaml", ".yml")):
        return False
    with open(path) as f:
        content = yaml.safe_load(f)
    return isinstance(content, dict) and "MODEL" in content


def _sets_yacs_device(path: str, pairs: Sequence[Tuple[str, str]]) -> bool:
    """Whether the yacs file or its overrides set ``MODEL.DEVICE`` (detectron2's default,
    "cuda", is not a choice of the user's: the lazy config's ``train.device`` decides then)."""
    if any(key == "MODEL.DEVICE" for key, _ in pairs):
        return True
    with open(path) as f:
        model = yaml.safe_load(f).get("MODEL") or {}
    return isinstance(model, dict) and "DEVICE" in model


def _split_overrides(overrides: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--opts: {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        pairs.append((key, value))
    return pairs


def load_config(
    config_file: str, overrides: Sequence[str] = (), weights: Optional[str] = None
) -> ModelConfig:
    """
    Loads a ``--config-file``: a lazy config (``.py``, or the converter's ``config.yaml``), a
    packaged config's name, or a thin yacs ``.yaml`` (``MODEL.GROUNDING_DINO.CONFIG_FILE``),
    with ``KEY=VALUE`` overrides of that kind (``model.box_threshold=0.3`` or
    ``MODEL.DEVICE=cpu``).

    Raises:
        FileNotFoundError: no such config or weights file.
        ValueError: a malformed override.
    """
    try:
        config_file = _config_path(config_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config-file {config_file} not found") from None
    pairs = _split_overrides(overrides)
    if _is_yacs_file(config_file):
        cfg = get_cfg()
        add_grounding_dino_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list([x for pair in pairs for x in pair])
        result = ModelConfig(
            load_lazy_config_from_yacs(cfg),
            weights or cfg.MODEL.WEIGHTS or None,
            cfg.MODEL.DEVICE if _sets_yacs_device(config_file, pairs) else None,
            default_prompt_from_yacs(cfg),
        )
    else:
        lazy = _load_lazy(config_file, overrides)
        weights = weights or OmegaConf.select(lazy, "train.init_checkpoint", default=None)
        result = ModelConfig(lazy, weights or None)
    if result.weights and not os.path.isfile(result.weights):
        raise FileNotFoundError(f"--weights {result.weights}: no such file")
    return result


def build_model(cfg, weights: Optional[str] = None, device: Optional[str] = None):
    """
    Instantiates ``cfg.model`` on ``device`` (see :func:`resolve_device`), loads ``weights``
    (default: ``cfg.train.init_checkpoint``) strictly, and puts it in eval mode.

    Raises:
        KeyError: the config has no ``model``.
        ValueError: no weights at all (a randomly initialised model is refused).
        CheckpointMismatchError: the weights do not match the model (keys named).
    """
    if OmegaConf.select(cfg, "model", default=_MISSING) is _MISSING:
        raise KeyError("The config has no 'model' entry")
    if weights is None:
        weights = OmegaConf.select(cfg, "train.init_checkpoint", default=None)
    if not weights:
        raise ValueError(
            "no weights: none are given and the config's train.init_checkpoint is empty; the "
            "model would predict with its random initialisation. Pass a checkpoint, e.g. one "
            "written by python -m grounding_dino.convert"
        )
    model = instantiate(cfg.model)
    model.to(resolve_device(device, cfg)).eval()
    # Mapped, not read whole: the state dict is copied into the model and dropped, and a read
    # copy would stay in the heap after loading (0.3 GB for Swin-T + BERT-base).
    GroundingDINOCheckpointer(model).load(weights, map_file=True)
    return model


def get(config, weights: Optional[str] = None, overrides: Sequence[str] = (), device=None):
    """
    A built model with its weights, in eval mode (detectron2's ``model_zoo.get``).

    Args:
        config: a packaged config's name, a lazy config file, or a loaded lazy config.
        weights: the checkpoint (default: the config's ``train.init_checkpoint``).
        overrides: ``key=value`` overrides of the config.
        device: "cpu", "cuda", ... (default: the config's ``train.device``, else the CPU).
    """
    if isinstance(config, str):
        cfg = get_config(config, overrides)
    else:
        cfg = apply_overrides(config, list(overrides))
    return build_model(cfg, weights, device)


def add_model_arguments(
    parser, *, weights_help: Optional[str] = None, device_help: Optional[str] = None
) -> None:
    """
    Adds the arguments that choose a model to an ``argparse`` parser: ``--config-file``,
    ``--weights``, ``--opts``, ``--device`` and ``--dtype``; read them with
    :func:`load_config` (``args.config_file, args.opts, args.weights``). ``weights_help`` and
    ``device_help`` replace the default help of a program whose defaults differ.
    """
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="lazy config (.py, the converter's config.yaml, or a packaged config's name) or "
        "a thin yacs .yaml",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help=weights_help or "checkpoint (default: the config's init_checkpoint / MODEL.WEIGHTS)",
    )
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument(
        "--device",
        default=None,
        help=device_help
        or "cpu, cuda, or auto (CUDA when available, else the CPU); default: the config's",
    )
    add_dtype_argument(parser.add_argument)
