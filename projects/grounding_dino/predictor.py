"""``GroundingDINOPredictor``: the model for scripts, from a lazy config and a checkpoint."""

from typing import Dict, List, Optional, Sequence

import torch

from .model_zoo import ModelConfig, build_model, load_config, resolve_device
from .modeling.settings import InferenceSettings, settings_or_default
from .precision import check_precision, outputs_to_fp32, precision_context
from .predictor_core import PredictorCore, mask_stage_for_predictor
from .resize import official_resize_from_lazy_config

__all__ = ["GroundingDINOPredictor"]


class GroundingDINOPredictor(PredictorCore):
    """
    Runs a Grounding DINO on BGR images (as read by ``cv2.imread``) with a text prompt.

    Example::

        predictor = GroundingDINOPredictor.from_config_file(
            "configs/grounding_dino_swin_t_ogc.py", weights="model.pth")
        out = predictor(image_bgr, "cat . remote control .")   # or ["cat", "remote control"]
        out["instances"].pred_boxes, out["phrases"]
        loose = predictor.settings.replace(box_threshold=0.2)
        out = predictor(image_bgr, ["cat"], settings=loose)    # this call only
    """

    def __init__(
        self,
        cfg,
        weights: Optional[str] = None,
        input_format: str = "BGR",
        dtype: str = "fp32",
        *,
        device: Optional[str] = None,
        settings: Optional[InferenceSettings] = None,
        allow_emulated_bf16: bool = False,
        mask_stage=None,
    ):
        """
        Args:
            cfg: a lazy config with a ``model`` entry (and ``train.init_checkpoint`` when
                ``weights`` is None).
            weights: checkpoint to load (detectron2 format, e.g. from grounding_dino.convert);
                None: ``cfg.train.init_checkpoint``. It must match the model exactly (same
                keys and shapes), else :class:`~grounding_dino.checkpoint.CheckpointMismatchError`
                names the keys.
            input_format: channel order of the arrays given to ``__call__``.
            dtype: precision mode (:mod:`grounding_dino.precision`): "fp32", "bf16" (autocast,
                CPU or CUDA) or "fp16" (autocast, CUDA only). Outputs are float32 in every mode.
            device: where the model runs: "cpu", "cuda", "auto" (CUDA when available, else
                the CPU); None: the config's ``train.device``, else the CPU. A CUDA device
                without CUDA is an error (:func:`~grounding_dino.devices.resolve_device`).
            settings: the default :class:`InferenceSettings` of the calls (None: the model's,
                from the config).
            allow_emulated_bf16: run ``dtype="bf16"`` on a CPU without native bfloat16 (tens
                of times slower than fp32) instead of refusing it
                (:func:`~grounding_dino.precision.check_precision`).
            mask_stage: a :class:`~grounding_dino.segment.MaskStage` (or the path of a SAM /
                SAM-HQ / SAM 2 folder, loaded on this device with this ``dtype``) that fills
                ``pred_masks`` from the boxes; None: the config's ``mask_stage`` node, and
                without one no masks (nothing is loaded). See docs/segmentation.md.

        Raises:
            ValueError: no weights are given (a randomly initialised model is refused),
                ``dtype`` is unknown or not offered on the device (fp16 on the CPU, bf16 on a
                CPU without native bfloat16 unless allowed), or CUDA is asked for but absent.
        """
        self.cfg = cfg
        device = resolve_device(device, cfg)
        self.dtype = check_precision(dtype, device, allow_emulated_bf16=allow_emulated_bf16)
        self.model = build_model(cfg, weights, device)
        self.input_format = input_format
        self.model_input_format = self.model.input_format
        self.stride = self.model.backbone.size_divisibility
        self.resize = official_resize_from_lazy_config(cfg)
        self._settings = settings_or_default(settings, self.model.inference_settings)
        self.mask_stage = mask_stage_for_predictor(mask_stage, cfg, device, self.dtype)

    @classmethod
    def from_config_file(
        cls, path: str, weights: Optional[str] = None, overrides: Sequence[str] = (), **kwargs
    ) -> "GroundingDINOPredictor":
        """Loads a config (a lazy ``.py``/``.yaml``, a packaged config's name, or a thin yacs
        ``.yaml``) and applies ``key=value`` overrides; ``kwargs`` (``input_format``,
        ``dtype``, ``device``, ``settings``, ``mask_stage``) go to the constructor."""
        return cls.from_model_config(load_config(path, overrides, weights), **kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "GroundingDINOPredictor":
        """The predictor of a loaded ``--config-file`` (:func:`~grounding_dino.model_zoo.
        load_config`): its weights, and its device unless ``kwargs`` name one."""
        if kwargs.get("device") is None:
            kwargs["device"] = config.device
        return cls(config.lazy, weights=config.weights or "", **kwargs)

    @torch.no_grad()
    def _predict(self, records: List[Dict], settings: InferenceSettings) -> List[Dict]:
        with precision_context(self.dtype, self.model.device):
            return outputs_to_fp32(self.model.inference(records, settings=settings))
