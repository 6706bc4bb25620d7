"""Evaluation settings: the model run without its display threshold, passed per call.

``model.box_threshold`` and ``model.max_detections`` decide what a user sees. An evaluation
must not depend on them: a box under the display threshold still counts for AP, and REC scores
the best box of an expression whatever its score. So evaluations run the model through
:class:`InferenceWithSettings` with :func:`evaluation_settings`, and the model is not changed.
"""

import math
from typing import Dict, List

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..modeling.settings import InferenceSettings

__all__ = ["EVAL_MAX_DETECTIONS", "evaluation_settings", "InferenceWithSettings"]

EVAL_MAX_DETECTIONS = 300
"""Detections per image the evaluation asks for (more when ``model.max_detections`` is larger,
e.g. for LVIS fixed AP)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else model


def evaluation_settings(model: nn.Module) -> InferenceSettings:
    """
    The settings the evaluation runs ``model`` (or the module a DDP wrapper holds) with: its
    own, without a box threshold (``-inf``) and with ``max(EVAL_MAX_DETECTIONS,
    model.max_detections)`` detections per image.

    Raises:
        AttributeError: the model has no ``inference_settings`` (not a Grounding DINO).
    """
    module = _unwrap(model)
    settings = getattr(module, "inference_settings", None)
    if not isinstance(settings, InferenceSettings):
        raise AttributeError(
            f"{type(module).__name__} has no inference_settings: train_net evaluates Grounding "
            "DINO models"
        )
    budget = max(EVAL_MAX_DETECTIONS, settings.max_detections)
    return settings.replace(box_threshold=-math.inf, max_detections=budget)


class InferenceWithSettings(nn.Module):
    """
    ``model`` whose forward is ``model.inference(inputs, settings=settings)``: what
    :func:`~detectron2.evaluation.inference_on_dataset` calls, so that the evaluation passes
    its settings instead of changing the model (``eval()`` and ``train()`` reach the model as
    a child module).
    """

    def __init__(self, model: nn.Module, settings: InferenceSettings):
        super().__init__()
        self.model = model
        self.settings = settings

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return _unwrap(self.model).inference(batched_inputs, settings=self.settings)
