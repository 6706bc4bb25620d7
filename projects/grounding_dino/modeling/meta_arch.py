"""The Grounding DINO meta-architecture for Detectron2."""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch import nn

from ..config import yacs_model_kwargs
from ..preprocessing import Prompt, normalize_image, prompt_to_input, runs_for_inputs
from ..resize import resize_uint8_image
from ..text.structures import TokenizedText
from .denoising import prepare_for_cdn, split_dn_outputs
from .head import layer_logits
from .postprocessing import detections_for_inputs
from .settings import InferenceSettings, settings_or_default
from .structures import ImageTokens, MultiScaleFeatures

__all__ = ["GroundingDINO", "GroundingDINOFromYacs", "targets_from_instances"]


@META_ARCH_REGISTRY.register()
class GroundingDINO(nn.Module):
    """
    Grounding DINO (arXiv 2303.05499): image + text prompt in, boxes and grounded phrases out.

    Inputs are detectron2's list of dicts with ``"image"`` ([3, H, W], 0-255, in
    ``input_format``), optionally ``"height"``, ``"width"`` (the size to return boxes in), and
    a prompt: ``"caption"`` (str) or ``"category_names"`` (list of str). Training dicts also
    carry ``"instances"`` with ``gt_boxes``, ``gt_classes`` and ``gt_positive_map`` (see
    docs/interfaces.md).

    The data flow: the image body and the neck give multi-scale maps; the prompt encoder turns
    each input's prompt into passes ("runs") of at most ``max_text_len`` tokens; per run, the
    text encoder, the feature enhancer, the query selector, the decoder and the contrastive
    head give token logits and boxes; :func:`grounding_postprocess` turns them into
    detections.

    The inference settings (``box_threshold``, ``text_threshold``, ``max_detections``) are
    fixed at construction (``inference_settings``); a call that wants others passes them:
    ``model.inference(inputs, settings=model.inference_settings.replace(box_threshold=0.3))``.

    Built from a yacs config (``build_model(cfg)`` or ``DefaultPredictor`` with
    ``MODEL.META_ARCHITECTURE: "GroundingDINO"``, see :mod:`grounding_dino.config`), the
    model also holds a ``default_prompt`` for inputs without one and the official
    ``test_resize``, which it applies to each CPU image as ``GroundingDINOPredictor`` does.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        position_embedding: nn.Module,
        prompt_encoder,
        text_encoder: nn.Module,
        enhancer: nn.Module,
        query_selector: nn.Module,
        decoder: nn.Module,
        head: nn.Module,
        criterion: Optional[nn.Module],
        box_threshold: float,
        text_threshold: float,
        max_detections: int,
        hidden_dim: int,
        num_feature_levels: int,
        max_text_len: int,
        dn_number: int,
        dn_label_noise_ratio: float,
        dn_box_noise_scale: float,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str,
        default_prompt: Optional[Prompt] = None,
        test_resize=None,
    ):
        """
        Args:
            backbone: image body, a detectron2 ``Backbone`` (IMAGE_BACKBONE_REGISTRY).
            neck: input projections (``InputProjectionNeck``) from the body's maps to
                ``num_feature_levels`` maps of ``hidden_dim`` channels.
            position_embedding: valid mask [B, H, W] -> [B, hidden_dim, H, W].
            prompt_encoder: ``PromptEncoder``: prompts -> runs -> ``TokenizedText``.
            text_encoder: ``TokenizedText`` -> ``EncodedText`` (TEXT_ENCODER_REGISTRY).
            enhancer: feature enhancer (FEATURE_ENHANCER_REGISTRY).
            query_selector: language-guided query selector (QUERY_SELECTOR_REGISTRY).
            decoder: cross-modality decoder (DECODER_REGISTRY).
            head: contrastive head of the decoder layers, queries . text -> token logits (one
                shared module, or an ``nn.ModuleList`` of one per layer: ``head.layer_heads``).
            criterion: training loss; None for an inference-only model.
            box_threshold: keep boxes whose best score exceeds this.
            text_threshold: tokens above this score form a box's phrase.
            max_detections: at most this many boxes per image.
            hidden_dim, num_feature_levels, max_text_len: sizes the components share
                (checked against them here).
            dn_number: denoising queries per image in training (0 disables denoising).
            dn_label_noise_ratio, dn_box_noise_scale: DINO's CDN noise.
            pixel_mean, pixel_std: normalisation, 0-255 scale, in ``input_format`` order.
            input_format: channel order of input images, "RGB" or "BGR".
            default_prompt: caption (str) or class names (list of str) of inputs that carry
                no prompt (``DefaultPredictor`` passes none); None: inputs must carry one.
            test_resize: a detectron2 augmentation applied at inference to each uint8 CPU
                image before anything else (the yacs bridge's official resize); None: images
                are used as given.
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        _check_sizes(backbone, neck, prompt_encoder, hidden_dim, num_feature_levels, max_text_len)
        self.backbone = backbone
        self.neck = neck
        self.position_embedding = position_embedding
        self.prompt_encoder = prompt_encoder
        self.text_encoder = text_encoder
        self.enhancer = enhancer
        self.query_selector = query_selector
        self.decoder = decoder
        self.head = head
        self.criterion = criterion
        self._inference_settings = InferenceSettings(
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            max_detections=max_detections,
        )
        if default_prompt is not None:
            prompt_to_input(default_prompt)  # validates
        self.default_prompt = default_prompt
        self.test_resize = test_resize
        self.max_text_len = max_text_len
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        """The keyword arguments a yacs config describes (see :mod:`grounding_dino.config`)."""
        return yacs_model_kwargs(cfg, cls)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def inference_settings(self) -> InferenceSettings:
        """The configured defaults of :meth:`inference` (read-only)."""
        return self._inference_settings

    @property
    def box_threshold(self) -> float:
        return self._inference_settings.box_threshold

    @property
    def text_threshold(self) -> float:
        return self._inference_settings.text_threshold

    @property
    def max_detections(self) -> int:
        return self._inference_settings.max_detections

    def __setattr__(self, name, value):
        if name in ("box_threshold", "text_threshold", "max_detections", "inference_settings"):
            raise AttributeError(
                f"GroundingDINO.{name} is set at construction (the config's model.{name}); "
                f"pass other values per call: model.inference(inputs, "
                f"settings=model.inference_settings.replace(...)), or a predictor's settings="
            )
        super().__setattr__(name, value)

    @property
    def tokenizer(self):
        """The prompt encoder's Hugging Face tokenizer."""
        return self.prompt_encoder.tokenizer

    # ------------------------------------------------------------------ inputs
    def with_defaults(self, record: Dict) -> Dict:
        """
        An inference input with what the caller could not pass: ``default_prompt`` when it has
        no prompt, and the image resized with ``test_resize`` (on the CPU, uint8 pixels;
        ``"height"`` / ``"width"`` default to the size before the resize). Unchanged when the
        model has neither.
        """
        if self.default_prompt is None and self.test_resize is None:
            return record
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
                    f"{type(self).__name__} resizes images on the CPU (the official PIL "
                    f"resize) before moving them to the model's device; got an image on "
                    f"{image.device}. Pass CPU tensors, as DefaultPredictor does."
                )
            record.setdefault("height", image.shape[-2])
            record.setdefault("width", image.shape[-1])
            record["image"] = resize_uint8_image(image, self.test_resize)
        return record

    def preprocess_image(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """
        Checks and normalises each input's image.

        Returns:
            list of [3, H_i, W_i] float RGB tensors on the model's device (not padded: the
            neck pads them, so each image is processed at its own size).
        """
        stride = self.backbone.size_divisibility
        images = []
        for index, record in enumerate(batched_inputs):
            image = record.get("image") if isinstance(record, dict) else None
            if not isinstance(image, torch.Tensor):
                raise ValueError(
                    f"Input {index}: 'image' must be a [3, H, W] tensor, got "
                    f"{type(image).__name__}"
                )
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"Input {index}: 'image' must have shape [3, H, W], got "
                    f"{tuple(image.shape)} (grayscale/RGBA must be converted)"
                )
            if min(image.shape[1:]) < stride:
                raise ValueError(
                    f"Input {index}: image {tuple(image.shape[1:])} is smaller than "
                    f"the backbone's stride {stride}"
                )
            images.append(
                normalize_image(image, self.pixel_mean, self.pixel_std, self.input_format)
            )
        return images

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Returns:
            in training, a dict of losses; otherwise a list with, for each input,
            ``{"instances": Instances, "phrases": [str]}`` (see docs/interfaces.md).
        """
        if self.training:
            return self.forward_training(batched_inputs)
        return self.inference(batched_inputs)

    def image_features(self, images: List[torch.Tensor]) -> MultiScaleFeatures:
        """The body, the neck and the position embedding: one row per image."""
        maps, masks = self.neck.forward_images(self.backbone, images)
        positions = [self.position_embedding(mask).to(m.dtype) for m, mask in zip(maps, masks)]
        return MultiScaleFeatures(maps, masks, positions)

    def forward_transformer(
        self, images: List[torch.Tensor], runs: List, targets: Optional[List[Dict]] = None
    ) -> Dict:
        """
        The network after preprocessing: one row per run (an image with one caption).

        Args:
            images: normalised [3, H, W] images.
            runs: ``PromptRun`` s (``prompt_encoder.runs_for_input``); several runs may share
                an image (chunks of a long prompt), whose features are then computed once.
            targets: training targets (see :func:`targets_from_instances`), one per run; with
                ``dn_number > 0`` they also become contrastive denoising queries.

        Returns:
            the head outputs of docs/interfaces.md: ``pred_logits`` [R, Q, max_text_len],
            ``pred_boxes`` [R, Q, 4], ``aux_outputs``, ``enc_outputs``, ``text_mask``
            [R, max_text_len], with denoising ``dn_outputs``; and ``dn_meta`` (None without
            denoising).
        """
        features = self.image_features(images)
        index = torch.tensor([run.image_index for run in runs], device=self.device)
        if len(runs) != len(images) or any(r.image_index != i for i, r in enumerate(runs)):
            features = features.index_select(index)
        tokens = self.prompt_encoder.batch(runs, self.device)
        return self.forward_tokens(features.flatten(), tokens, targets)

    def forward_tokens(
        self, image: ImageTokens, tokens: TokenizedText, targets: Optional[List[Dict]] = None
    ) -> Dict:
        """
        The network from flattened image features and tokenised text (one row per run): the
        part of :meth:`forward_transformer` that holds no Python objects, so that it traces
        (ONNX export, ``grounding_dino.export``).

        Args:
            image: [R, S, C] image tokens and their layout (``MultiScaleFeatures.flatten``).
            tokens: R tokenised runs of L tokens (``PromptEncoder.batch``).
            targets: as :meth:`forward_transformer`.

        Returns:
            as :meth:`forward_transformer`.
        """
        text = self.text_encoder(tokens)
        image, text = self.enhancer(image, text)
        queries, reference, enc_outputs = self.query_selector(image, text)

        self_attention_mask = dn_meta = None
        if targets is not None and self.dn_number > 0:
            dn_content, dn_reference, blocked, dn_meta = prepare_for_cdn(
                targets,
                text.features,
                text.token_mask,
                num_queries=self.query_selector.num_queries,
                dn_number=self.dn_number,
                label_noise_ratio=self.dn_label_noise_ratio,
                box_noise_scale=self.dn_box_noise_scale,
            )
            if dn_meta is not None:
                queries = torch.cat([dn_content, queries], 1)
                reference = torch.cat([dn_reference, reference], 1)
                self_attention_mask = ~blocked
        hidden, boxes = self.decoder(
            queries, reference, image, text, self_attention_mask=self_attention_mask
        )
        logits = layer_logits(self.head, hidden, text.features, text.token_mask)
        dn_logits, logits = split_dn_outputs(logits, dn_meta)
        dn_boxes, boxes = split_dn_outputs(torch.stack(boxes), dn_meta)
        outputs = _layer_outputs(logits, boxes)
        if dn_meta is not None:
            outputs["dn_outputs"] = _layer_outputs(dn_logits, dn_boxes)
        text_mask = text.token_mask.new_zeros(text.token_mask.shape[0], self.max_text_len)
        text_mask[:, : text.token_mask.shape[1]] = text.token_mask
        outputs.update(enc_outputs=enc_outputs, text_mask=text_mask, dn_meta=dn_meta)
        return outputs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(
        self, batched_inputs: List[Dict], settings: Optional[InferenceSettings] = None
    ) -> List[Dict]:
        """
        Detections of each input (see docs/interfaces.md), boxes in ``"height"`` x
        ``"width"`` pixels (default: the image's own size).

        Args:
            batched_inputs: detectron2's list of input dicts.
            settings: thresholds, detection budget, NMS and REC mode of this call; None: the
                model's ``inference_settings``.
        """
        settings = settings_or_default(settings, self._inference_settings)
        batched_inputs = [self.with_defaults(record) for record in batched_inputs]
        images = self.preprocess_image(batched_inputs)
        runs = runs_for_inputs(self.prompt_encoder, batched_inputs)
        outputs = self.forward_transformer(images, runs)
        return detections_for_inputs(
            batched_inputs,
            [tuple(image.shape[1:]) for image in images],
            outputs["pred_logits"],
            outputs["pred_boxes"],
            runs,
            self.prompt_encoder,
            settings,
        )

    # ------------------------------------------------------------------ training
    def forward_training(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The criterion's losses on a batch of captioned training inputs."""
        if self.criterion is None:
            raise ValueError("GroundingDINO was built with criterion=None; it cannot train")
        images = self.preprocess_image(batched_inputs)
        runs, targets = [], []
        for index, record in enumerate(batched_inputs):
            if "caption" not in record or "instances" not in record:
                raise ValueError(f"Training input {index} needs 'caption' and 'instances'")
            # With the mapper's "input_ids" the caption is one run, cut at max_text_len as
            # its positive maps are.
            record_runs = self.prompt_encoder.runs_for_input(index, record)
            if len(record_runs) != 1:
                raise ValueError(
                    f"Training input {index}: the caption needs {len(record_runs)} passes of "
                    f"max_text_len={self.max_text_len} tokens; give the mapper's 'input_ids'"
                )
            runs.extend(record_runs)
            targets.append(
                targets_from_instances(
                    record["instances"], images[index].shape[1:], self.max_text_len, self.device
                )
            )
        outputs = self.forward_transformer(images, runs, targets)
        return self.criterion(outputs, targets, outputs.pop("dn_meta"))


def targets_from_instances(
    instances: Instances, image_size, max_text_len: int, device
) -> Dict[str, torch.Tensor]:
    """
    The criterion's target of one training input.

    Args:
        instances: ``gt_boxes`` (xyxy pixels of the image), ``gt_positive_map`` [N, max_text_len],
            ``gt_classes`` [N].
        image_size: (height, width) of the image the boxes are in.

    Returns:
        ``{"boxes": [N, 4] cxcywh normalised by image_size, "positive_map": [N, max_text_len]
        float, "labels": [N] long}``.
    """
    height, width = image_size
    x0, y0, x1, y1 = instances.gt_boxes.tensor.to(device).unbind(-1)
    boxes = torch.stack(
        [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], -1
    )
    positive_map = instances.gt_positive_map.to(device, torch.float32)
    if positive_map.shape[1] != max_text_len:
        raise ValueError(
            f"gt_positive_map has {positive_map.shape[1]} columns, expected "
            f"max_text_len={max_text_len}"
        )
    return {"boxes": boxes, "positive_map": positive_map, "labels": instances.gt_classes.to(device)}


def _layer_outputs(logits: torch.Tensor, boxes: torch.Tensor) -> Dict:
    """Per-layer stacks [num_layers, B, Q, *] -> last layer's outputs with ``aux_outputs``."""
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    outputs["aux_outputs"] = [
        {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
        for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])
    ]
    return outputs


def _check_sizes(backbone, neck, prompt_encoder, hidden_dim, num_levels, max_text_len) -> None:
    """Checks that the components agree on the sizes the configs interpolate."""
    neck.check_backbone(backbone)  # the body's output channels are the neck's in_channels
    for name, value, expected in (
        ("neck.hidden_dim", neck.hidden_dim, hidden_dim),
        ("neck.num_feature_levels", neck.num_feature_levels, num_levels),
        ("prompt_encoder.max_text_len", prompt_encoder.max_text_len, max_text_len),
    ):
        if value != expected:
            raise ValueError(f"{name}={value} but the model has {name.split('.')[1]}={expected}")


@META_ARCH_REGISTRY.register()
class GroundingDINOFromYacs(GroundingDINO):
    """
    The name the thin yamls have used for ``MODEL.META_ARCHITECTURE``: the same model as
    :class:`GroundingDINO` (same arguments, checkpoints and outputs), kept so that existing
    yacs configs keep working.
    """
