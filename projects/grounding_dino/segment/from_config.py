"""The config node ``mask_stage``: a lazy call that builds the optional mask stage.

Example (a lazy ``.py`` config)::

    from detectron2.config import LazyCall as L
    from grounding_dino.segment import MaskStage

    mask_stage = L(MaskStage.from_pretrained)(path="checkpoints/sam-vit-base", box_batch_size=64)

``mask_stage = None`` (or no node at all) is the default: nothing is loaded. ``device`` and
``dtype`` left out of the node follow the predictor's.
"""

import copy
from typing import Optional

from detectron2.config import instantiate
from omegaconf import OmegaConf

from .stage import MaskStage

__all__ = ["MASK_STAGE_KEY", "mask_stage_from_config"]

MASK_STAGE_KEY = "mask_stage"


def mask_stage_from_config(cfg, *, device, dtype: str) -> Optional[MaskStage]:
    """
    Builds ``cfg.mask_stage`` when it is set.

    Args:
        cfg: a lazy config (an ``omegaconf.DictConfig``) or None.
        device, dtype: the detector's, used where the node does not name its own.

    Returns:
        a :class:`MaskStage`, or None when the node is absent or None (nothing loaded).

    Raises:
        ValueError: the node does not build a :class:`MaskStage`.
    """
    node = OmegaConf.select(cfg, MASK_STAGE_KEY, default=None) if cfg is not None else None
    if node is None:
        return None
    node = copy.deepcopy(node)
    for key, value in (("device", str(device)), ("dtype", dtype)):
        if key not in node:
            node[key] = value
    stage = instantiate(node)
    if not isinstance(stage, MaskStage):
        raise ValueError(
            f"The config's {MASK_STAGE_KEY} built a {type(stage).__name__}, not a MaskStage; "
            f"use L(MaskStage.from_pretrained)(path=...) or None"
        )
    return stage
