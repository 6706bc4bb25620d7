"""The model of the command-line tools: a lazy or thin yacs config file, overrides, weights."""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import yaml
from detectron2.config import LazyConfig, get_cfg
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import add_grounding_dino_config, default_prompt_from_yacs, load_lazy_config_from_yacs
from ..predictor import GroundingDINOPredictor

__all__ = ["ModelConfig", "load_model_config", "build_predictor", "config_digest", "file_digest"]


@dataclass
class ModelConfig:
    """
    Attributes:
        lazy: the lazy config (``model`` and, for the test resize, ``dataloader.test``).
        weights: the checkpoint to load (None: the config's ``train.init_checkpoint``).
        device: the device the config asks for, or None.
        default_prompt: the default prompt of a thin yacs config (None for lazy configs).
    """

    lazy: object
    weights: Optional[str]
    device: Optional[str]
    default_prompt: Optional[object] = None


def _is_yacs_file(path: str) -> bool:
    if not path.endswith((".yaml", ".yml")):
        return False
    with open(path) as f:
        content = yaml.safe_load(f)
    return isinstance(content, dict) and "MODEL" in content


def _split_opts(opts: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = []
    for item in opts:
        if "=" not in item:
            raise ValueError(f"--opts: {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        pairs.append((key, value))
    return pairs


def load_model_config(
    config_file: str, opts: Sequence[str] = (), weights: Optional[str] = None
) -> ModelConfig:
    """
    Loads ``--config-file``: a lazy config (``.py``, or the converter's ``config.yaml``) or a
    thin yacs ``.yaml`` (``MODEL.GROUNDING_DINO.CONFIG_FILE``), with ``KEY=VALUE`` overrides
    of that kind (``model.box_threshold=0.3`` or ``MODEL.DEVICE=cpu``).

    Raises:
        FileNotFoundError: no such config or weights file.
        ValueError: a malformed override.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file} not found")
    pairs = _split_opts(opts)
    if _is_yacs_file(config_file):
        cfg = get_cfg()
        add_grounding_dino_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list([x for pair in pairs for x in pair])
        result = ModelConfig(
            load_lazy_config_from_yacs(cfg),
            weights or cfg.MODEL.WEIGHTS or None,
            cfg.MODEL.DEVICE,
            default_prompt_from_yacs(cfg),
        )
    else:
        lazy = LazyConfig.load(config_file)
        lazy = LazyConfig.apply_overrides(lazy, [f"{k}={v}" for k, v in pairs])
        weights = weights or OmegaConf.select(lazy, "train.init_checkpoint", default=None)
        result = ModelConfig(lazy, weights or None, None)
    if result.weights and not os.path.isfile(result.weights):
        raise FileNotFoundError(f"--weights {result.weights}: no such file")
    return result


def build_predictor(config: ModelConfig, device: Optional[str] = None, dtype: str = "fp32"):
    """A ``GroundingDINOPredictor`` of ``config`` on ``device`` (default: the config's) in
    precision mode ``dtype`` (:mod:`grounding_dino.precision`)."""
    lazy = config.lazy
    device = device or config.device
    if device:
        lazy.train = dict(lazy.get("train", {}), device=device)
    return GroundingDINOPredictor(lazy, weights=config.weights, dtype=dtype)


def _callable_name(value) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def config_digest(lazy) -> str:
    """SHA-256 of what decides a prediction: the ``model`` node and the test resize."""
    model = _plain(lazy.model)
    if isinstance(model, dict) and isinstance(model.get("text_encoder"), dict):
        # The text cache's size does not change a prediction.
        model["text_encoder"].pop("cache_size", None)
    content = {
        "model": model,
        "test_resize": _plain(OmegaConf.select(lazy, "dataloader.test.mapper.augmentations")),
    }
    text = json.dumps(content, sort_keys=True, default=_callable_name)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a file's bytes (None for None)."""
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
