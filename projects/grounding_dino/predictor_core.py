"""The predictor core shared by :class:`~grounding_dino.GroundingDINOPredictor` (PyTorch) and
:class:`~grounding_dino.deploy.OnnxPredictor` (ONNX Runtime): they differ only in how the
network runs (:meth:`PredictorCore._predict`). Both run the optional mask stage
(:mod:`grounding_dino.segment`) on their boxes the same way (:meth:`PredictorCore._with_masks`)."""

import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from omegaconf import DictConfig

from .modeling.settings import InferenceSettings, settings_or_default
from .preprocessing import Prompt, check_token_spans, model_input, prompts_for_images

__all__ = ["PredictorCore", "mask_stage_for_predictor"]


class PredictorCore:
    """
    Images as arrays and prompts in, ``{"instances": Instances, "phrases": [str]}`` out.

    Subclasses set ``input_format``, ``model_input_format``, ``resize``, ``stride`` and
    ``settings`` (the default :class:`InferenceSettings`) and implement :meth:`_predict`.
    Every method takes ``settings=`` for one call; nothing changes the predictor's defaults.
    With a ``mask_stage`` (a :class:`~grounding_dino.segment.MaskStage`), every output's
    Instances also carry ``pred_masks`` ((N, H, W) bool) and ``mask_scores`` ((N,)).
    """

    input_format: str
    model_input_format: str
    stride: int
    resize = None
    mask_stage = None
    _settings: InferenceSettings

    @property
    def settings(self) -> InferenceSettings:
        """The default settings of the calls (the config's, or the constructor's)."""
        return self._settings

    def _predict(self, records: List[Dict], settings: InferenceSettings) -> List[Dict]:
        """Runs the network and the post-processing on model inputs (``model_input``)."""
        raise NotImplementedError

    def _settings_of_call(self, settings: Optional[InferenceSettings]) -> InferenceSettings:
        return settings_or_default(settings, self._settings)

    def _with_masks(self, images: Sequence[np.ndarray], outputs: List[Dict]) -> List[Dict]:
        """Adds the mask stage's ``pred_masks`` to each output (nothing without a stage)."""
        if self.mask_stage is None:
            return outputs
        from .segment import add_instances_masks

        for image, output in zip(images, outputs):
            rgb = image[:, :, ::-1] if self.input_format == "BGR" else image
            add_instances_masks(output["instances"], np.ascontiguousarray(rgb), self.mask_stage)
        return outputs

    def _input(self, image: np.ndarray, prompt: Prompt, index: int) -> Dict:
        return model_input(
            image,
            prompt,
            index,
            resize=self.resize,
            stride=self.stride,
            input_format=self.input_format,
            model_input_format=self.model_input_format,
        )

    def __call__(
        self, image: np.ndarray, prompt: Prompt, settings: Optional[InferenceSettings] = None
    ) -> Dict:
        """
        Args:
            image: HxWx3 uint8 array in ``input_format`` (BGR by default).
            prompt: a caption ("cat . remote control .") or a list of class names.
            settings: this call's settings (None: :attr:`settings`).

        Returns:
            ``{"instances": Instances, "phrases": [str]}`` in the image's pixels.
        """
        outputs = self._predict([self._input(image, prompt, 0)], self._settings_of_call(settings))
        return self._with_masks([image], outputs)[0]

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Union[Prompt, Sequence[Prompt]],
        settings: Optional[InferenceSettings] = None,
    ) -> List[Dict]:
        """
        Several images, each with its own prompt: ``prompts`` is a list with one prompt
        (caption or class list) per image, or a single caption for all images. Results equal
        one-by-one calls.
        """
        images, prompts = prompts_for_images(images, prompts)
        records = [self._input(im, p, i) for i, (im, p) in enumerate(zip(images, prompts))]
        return self._with_masks(images, self._predict(records, self._settings_of_call(settings)))

    def predict_rec(
        self, image: np.ndarray, expression: str, settings: Optional[InferenceSettings] = None
    ) -> Dict:
        """
        Referring expression comprehension: the single best box for ``expression``, whatever
        its score (the box the REC evaluator scores as top-1).

        Returns:
            ``{"instances": Instances with exactly one box, "phrases": [expression]}``.
        """
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError(
                f"The referring expression must be a non-empty string, got {expression!r}"
            )
        settings = self._settings_of_call(settings).replace(rec=True)
        return self(image, expression, settings)

    def predict_token_spans(
        self,
        image: np.ndarray,
        caption: str,
        token_spans,
        settings: Optional[InferenceSettings] = None,
    ) -> Dict:
        """
        Grounds selected phrases of a caption, like the official ``--token_spans``: each
        phrase is a list of character spans; its score for a box is the box's token scores
        averaged over the phrase's tokens (``positive_map @ probs``); (box, phrase) pairs
        above the box threshold are kept, best first.

        Args:
            image: HxWx3 uint8 array in ``input_format``.
            caption: the caption the spans index into.
            token_spans: e.g. ``[[[0, 3]], [[4, 8]]]`` (phrase 0 = caption[0:3], ...).

        Returns:
            ``{"instances": Instances(pred_boxes, scores, pred_classes = phrase index,
            token_scores), "phrases": [the phrase's text] * N}``, best score first.
        """
        token_spans = check_token_spans(caption, token_spans)
        record = self._input(image, caption, 0)
        record["token_spans"] = token_spans
        outputs = self._predict([record], self._settings_of_call(settings))
        return self._with_masks([image], outputs)[0]


def mask_stage_for_predictor(mask_stage, cfg, device: str, dtype: str):
    """The predictor's mask stage: the argument (a MaskStage, or a folder to load), else the
    config's ``mask_stage`` node, else None. The segment package is imported only when asked."""
    if mask_stage is None:
        if not isinstance(cfg, DictConfig) or cfg.get("mask_stage") is None:
            return None
        from .segment.from_config import mask_stage_from_config

        return mask_stage_from_config(cfg, device=device, dtype=dtype)
    if isinstance(mask_stage, (str, os.PathLike)):
        from .segment import MaskStage

        return MaskStage.from_pretrained(os.fspath(mask_stage), device=device, dtype=dtype)
    return mask_stage
