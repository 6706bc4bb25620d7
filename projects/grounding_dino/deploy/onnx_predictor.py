"""``OnnxPredictor``: the predictor's interface on an exported ONNX graph, run by ONNX Runtime.

Python keeps what is not the network, shared with :class:`~grounding_dino.GroundingDINOPredictor`
(not copied): the calls, checks and settings
(:class:`~grounding_dino.predictor_core.PredictorCore`), the pre-processing
(:mod:`grounding_dino.preprocessing`: resize, normalisation, prompt runs) and the
post-processing (``modeling.postprocessing.detections_for_inputs``). The graph
(``grounding_dino.export``) gets one image and its runs and returns token logits and boxes of
all queries.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import instantiate

from ..export.graph import INPUT_NAMES, OUTPUT_NAMES, read_metadata
from ..config_overrides import apply_overrides
from ..model_zoo import get_config
from ..modeling.postprocessing import detections_for_inputs
from ..modeling.settings import InferenceSettings, settings_or_default
from ..predictor_core import PredictorCore, mask_stage_for_predictor
from ..preprocessing import normalize_image, runs_for_inputs
from ..resize import official_resize_from_lazy_config

__all__ = ["OnnxPredictor", "onnx_feeds"]

logger = logging.getLogger(__name__)


def onnx_feeds(image: torch.Tensor, text) -> Dict[str, np.ndarray]:
    """The exported graph's inputs (``INPUT_NAMES``) for one image and its runs.

    Args:
        image: [3, H, W] normalised float image.
        text: the prompt encoder's ``TokenizedText`` of the R runs (``batch(runs)``).

    Returns:
        ``{"image": [1, 3, H, W], "input_ids", "token_mask", "position_ids": [R, L],
        "self_attention_mask": [R, L, L]}`` as numpy arrays.
    """
    return {
        "image": image[None].numpy(),
        "input_ids": text.input_ids.numpy(),
        "token_mask": text.token_mask.numpy(),
        "self_attention_mask": text.self_attention_mask.numpy(),
        "position_ids": text.position_ids.numpy(),
    }


class OnnxPredictor(PredictorCore):
    """
    Runs an exported Grounding DINO (``python -m grounding_dino.export onnx``) with ONNX
    Runtime on BGR images; returns what ``GroundingDINOPredictor`` returns.

    Example::

        predictor = OnnxPredictor("model.onnx", "configs/grounding_dino_swin_t_ogc.py")
        out = predictor(image_bgr, "cat . remote control .")   # or ["cat", "remote control"]
        out["instances"].pred_boxes, out["phrases"]

    The default settings (``box_threshold``, ``text_threshold``, ``max_detections``) come from
    the config's model; every call takes ``settings=`` as ``GroundingDINOPredictor``'s.
    """

    def __init__(
        self,
        onnx_path: str,
        config,
        overrides: Sequence[str] = (),
        *,
        input_format: str = "BGR",
        threads: Optional[int] = None,
        providers: Optional[List[str]] = None,
        settings: Optional[InferenceSettings] = None,
        mask_stage=None,
    ):
        """
        Args:
            onnx_path: the exported graph.
            config: the lazy config it was exported from (a path, .py/.yaml, or a loaded
                config); only its prompt encoder (the tokenizer), normalisation, resize and
                inference knobs are used, no torch weights.
            overrides: ``key=value`` config overrides.
            input_format: channel order of the arrays given to ``__call__``.
            threads: ONNX Runtime intra-op threads (None: its default, all cores).
            providers: ONNX Runtime execution providers (default: the CPU).
            settings: the default settings of the calls (None: the config model's).
            mask_stage: the mask stage, run by PyTorch on the graph's boxes: a
                :class:`~grounding_dino.segment.MaskStage`, or a SAM / SAM-HQ / SAM 2 folder
                (loaded on the CPU, fp32); None: the config's ``mask_stage`` node, else no
                masks (nothing is loaded). See docs/segmentation.md.

        Raises:
            FileNotFoundError: the graph or the config file does not exist.
            ValueError: the graph's inputs, outputs or sizes do not match the config.
        """
        import onnxruntime as ort

        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
        if isinstance(config, str):
            if not os.path.isfile(config):
                raise FileNotFoundError(f"config file {config} does not exist")
            cfg = get_config(config, overrides)
        else:
            cfg = apply_overrides(config, list(overrides))
        model_cfg = cfg.model
        self.prompt_encoder = instantiate(model_cfg.prompt_encoder)
        configured = InferenceSettings(
            box_threshold=model_cfg.box_threshold,
            text_threshold=model_cfg.text_threshold,
            max_detections=model_cfg.max_detections,
        )
        self._settings = settings_or_default(settings, configured)
        self.model_input_format = str(model_cfg.input_format)
        self.pixel_mean = torch.tensor(list(model_cfg.pixel_mean)).view(-1, 1, 1)
        self.pixel_std = torch.tensor(list(model_cfg.pixel_std)).view(-1, 1, 1)
        self.input_format = input_format
        self.resize = official_resize_from_lazy_config(cfg)

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            onnx_path, options, providers=providers or ["CPUExecutionProvider"]
        )
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self._check_graph(onnx_path)
        self.stride = int(self.metadata.get("size_divisibility", 32))
        self.mask_stage = mask_stage_for_predictor(mask_stage, cfg, "cpu", "fp32")

    def _check_graph(self, path: str) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != list(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
            raise ValueError(
                f"{path}: inputs {inputs} / outputs {outputs} are not a Grounding DINO graph's "
                f"{list(INPUT_NAMES)} / {list(OUTPUT_NAMES)}; export it with "
                f"python -m grounding_dino.export onnx"
            )
        expected = self.prompt_encoder.max_text_len
        found = (
            ("its logits output", self.session.get_outputs()[0].shape[2]),
            ("its metadata", self.metadata.get("max_text_len")),
        )
        for where, value in found:
            if isinstance(value, (int, str)) and str(value).isdigit() and int(value) != expected:
                raise ValueError(
                    f"{path} was exported with max_text_len={value} ({where}), but the "
                    f"config's model.max_text_len is {expected}; use the config it was "
                    f"exported from, or export again"
                )

    # ------------------------------------------------------------------ running
    def _run(self, image: torch.Tensor, runs) -> List[np.ndarray]:
        text = self.prompt_encoder.batch(runs)
        feeds = onnx_feeds(image, text)
        try:
            return self.session.run(list(OUTPUT_NAMES), feeds)
        except Exception as error:  # onnxruntime raises its own exception types
            raise RuntimeError(
                f"ONNX Runtime failed on an image of {tuple(image.shape[1:])} with "
                f"{text.input_ids.shape[0]} run(s) of {text.input_ids.shape[1]} tokens (too small "
                f"an image gives fewer feature positions than queries): {error}"
            ) from error

    def _predict(self, records: List[Dict], settings: InferenceSettings) -> List[Dict]:
        runs = runs_for_inputs(self.prompt_encoder, records)
        logits, boxes, sizes = [], [], []
        for index, record in enumerate(records):
            image = normalize_image(
                record["image"], self.pixel_mean, self.pixel_std, self.model_input_format
            )
            image_logits, image_boxes = self._run(
                image, [run for run in runs if run.image_index == index]
            )
            logits.append(torch.from_numpy(image_logits))
            boxes.append(torch.from_numpy(image_boxes))
            sizes.append(tuple(image.shape[1:]))
        return detections_for_inputs(
            records,
            sizes,
            torch.cat(logits),
            torch.cat(boxes),
            runs,
            self.prompt_encoder,
            settings,
        )
