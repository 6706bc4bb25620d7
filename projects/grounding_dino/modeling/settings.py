"""Inference settings: what a call to the model may choose, passed as data.

The model holds its configured defaults (``GroundingDINO.inference_settings``, from the
config's ``model.box_threshold``, ``model.text_threshold`` and ``model.max_detections``); a
caller that wants other values passes a settings object to ``inference`` (or to a predictor's
call) instead of changing the model, so two callers of one model never see each other's
values, and an exception cannot leave a model with the wrong ones.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["InferenceSettings", "NMS_CANDIDATES", "settings_or_default"]

NMS_CANDIDATES = 300
"""With NMS on, each pass keeps at least this many candidates (the official detection budget)
before NMS, so that the duplicates NMS removes leave room for other boxes under
``max_detections``."""


@dataclass(frozen=True)
class InferenceSettings:
    """
    Attributes:
        box_threshold: keep detections whose score exceeds this (-inf keeps every candidate,
            as the evaluation does).
        text_threshold: tokens scoring above this form a box's phrase (captions).
        max_detections: at most this many detections per image.
        nms_threshold: class-wise NMS IoU threshold (per phrase for captions), applied before
            the ``max_detections`` cap; 0 turns NMS off.
        rec: referring expression mode: exactly the single best box of a caption, whatever its
            score, with the whole expression as its phrase.
    """

    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_detections: int = 300
    nms_threshold: float = 0.0
    rec: bool = False

    def __post_init__(self):
        for name in ("box_threshold", "text_threshold", "nms_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"InferenceSettings.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        count = self.max_detections
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(
                f"InferenceSettings.max_detections must be a positive integer, got {count!r}"
            )
        if not 0.0 <= self.nms_threshold <= 1.0:
            raise ValueError(
                f"InferenceSettings.nms_threshold is an IoU in [0, 1] (0: no NMS), got "
                f"{self.nms_threshold}"
            )
        if not isinstance(self.rec, bool):
            raise ValueError(f"InferenceSettings.rec must be True or False, got {self.rec!r}")

    def replace(self, **changes) -> "InferenceSettings":
        """A copy with ``changes`` (checked as in the constructor); this object is unchanged.

        Raises:
            TypeError: a field that does not exist (named).
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"InferenceSettings has no field(s) {unknown}; fields: "
                + ", ".join(f.name for f in dataclasses.fields(self))
            )
        return dataclasses.replace(self, **changes)

    @property
    def effective_box_threshold(self) -> float:
        """The threshold post-processing applies (none in REC mode)."""
        return -math.inf if self.rec else self.box_threshold

    @property
    def effective_max_detections(self) -> int:
        """The detection budget post-processing applies (one box in REC mode)."""
        return 1 if self.rec else self.max_detections

    @property
    def effective_nms_threshold(self) -> float:
        """The NMS IoU threshold post-processing applies (0, none, in REC mode)."""
        return 0.0 if self.rec else self.nms_threshold

    @property
    def candidates_per_run(self) -> int:
        """Candidates a pass of the transformer keeps for the merge (and NMS)."""
        if self.effective_nms_threshold > 0:
            return max(self.max_detections, NMS_CANDIDATES)
        return self.effective_max_detections


def settings_or_default(
    settings: Optional[InferenceSettings], default: InferenceSettings
) -> InferenceSettings:
    """The settings of one call: ``settings``, or ``default`` when it is None.

    Raises:
        TypeError: ``settings`` is not an :class:`InferenceSettings` (e.g. a dict).
    """
    if settings is None:
        return default
    if not isinstance(settings, InferenceSettings):
        raise TypeError(f"settings must be an InferenceSettings, got {type(settings).__name__}")
    return settings
