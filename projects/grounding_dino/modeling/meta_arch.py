"""The Grounding DINO meta-architecture for Detectron2."""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from torch import nn

from ..text import (
    caption_from_categories,
    chunk_caption,
    chunk_categories,
    normalize_caption,
    phrases_from_token_scores,
    positive_map_from_spans,
)
from .head import ContrastiveHead

__all__ = ["GroundingDINO", "PromptRun"]

logger = logging.getLogger(__name__)


@dataclass
class PromptRun:
    """
    One pass of the transformer: an image with one caption (a whole prompt or one chunk).

    Attributes:
        image_index: index of the input the run belongs to.
        caption: normalised caption.
        category_indices: for category prompts, the global indices of the categories in this
            caption (None for free captions).
        positive_map: for category prompts, [C_run, max_text_len] normalised token map.
        phrase_offset: index of the chunk's first phrase in the whole caption.
    """

    image_index: int
    caption: str
    category_indices: Optional[List[int]] = None
    positive_map: Optional[torch.Tensor] = None
    phrase_offset: int = 0


@META_ARCH_REGISTRY.register()
class GroundingDINO(nn.Module):
    """
    Grounding DINO (arXiv 2303.05499): image + text prompt in, boxes and grounded phrases out.

    Inputs are detectron2's list of dicts with ``"image"`` ([3, H, W], 0-255, in
    ``input_format``), ``"height"``, ``"width"`` and a prompt: ``"caption"`` (str) or
    ``"category_names"`` (list of str). Training dicts also carry ``"instances"`` with
    ``gt_boxes``, ``gt_classes`` and ``gt_positive_map``.

    The inference knobs ``box_threshold``, ``text_threshold`` and ``max_detections`` are plain
    attributes (top level of the model config) and may be changed at any time.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        text_encoder: nn.Module,
        enhancer: nn.Module,
        query_selector: nn.Module,
        decoder: nn.Module,
        criterion: Optional[nn.Module] = None,
        head: Optional[nn.Module] = None,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        max_detections: int = 300,
        max_text_len: int = 256,
        hidden_dim: int = 256,
        num_feature_levels: int = 4,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
        dn_number: int = 100,
        dn_label_noise_ratio: float = 0.5,
        dn_box_noise_scale: float = 1.0,
        freeze_text_encoder: bool = False,
        freeze_backbone_stages: int = -1,
        default_prompt=None,
        test_resize=None,
    ):
        """
        Args:
            backbone: image backbone with input projections (IMAGE_BACKBONE_REGISTRY).
            text_encoder: text encoder (TEXT_ENCODER_REGISTRY), e.g. BertTextEncoder.
            enhancer: feature enhancer (FEATURE_ENHANCER_REGISTRY).
            query_selector: language-guided query selector (QUERY_SELECTOR_REGISTRY).
            decoder: cross-modality decoder (DECODER_REGISTRY).
            criterion: training loss; required for training only.
            head: the contrastive head of the decoder layers (default: the parameter-free
                :class:`ContrastiveHead`, as the official model).
            box_threshold: keep boxes whose best score exceeds this.
            text_threshold: tokens above this score form a box's phrase.
            max_detections: at most this many boxes per image.
            max_text_len: token capacity of one pass; longer prompts are chunked.
            hidden_dim, num_feature_levels: sizes the components share (the configs
                interpolate them); checked against the backbone.
            pixel_mean, pixel_std: normalisation, 0-255 scale, in ``input_format`` order.
            input_format: channel order of input images, "RGB" or "BGR".
            dn_number: denoising queries per image in training (0 disables denoising).
            dn_label_noise_ratio, dn_box_noise_scale: DINO's CDN noise.
            freeze_text_encoder: keep BERT frozen (no gradients).
            freeze_backbone_stages: freeze the patch embedding and Swin stages up to this
                index (-1: nothing frozen).
            default_prompt: caption (str) or class names (list) for inference inputs that
                carry neither "caption" nor "category_names" (set by the yacs bridge for
                DefaultPredictor, which passes only the image).
            test_resize: a detectron2 Augmentation applied to each inference image before
                normalisation (the yacs bridge's official resize); None: images are used as given.
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        backbone_dims = (
            getattr(backbone, "hidden_dim", hidden_dim),
            getattr(backbone, "num_feature_levels", num_feature_levels),
        )
        if backbone_dims != (hidden_dim, num_feature_levels):
            raise ValueError(
                f"backbone gives (hidden_dim, levels)={backbone_dims}, the model "
                f"expects {(hidden_dim, num_feature_levels)}"
            )
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.enhancer = enhancer
        self.query_selector = query_selector
        self.decoder = decoder
        self.head = head if head is not None else ContrastiveHead(max_text_len)
        self.criterion = criterion
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_detections = max_detections
        self.default_prompt = default_prompt
        self.test_resize = test_resize
        self.max_text_len = max_text_len
        self.input_format = input_format
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.freeze_text_encoder = freeze_text_encoder
        if freeze_text_encoder:
            for parameter in self.text_encoder.bert.parameters():
                parameter.requires_grad_(False)
        if freeze_backbone_stages >= 0:
            _freeze_swin_stages(self.backbone, freeze_backbone_stages)

    @classmethod
    def from_config(cls, cfg):
        """Keyword arguments from a yacs config (``build_model(cfg)``, ``DefaultPredictor``)."""
        from ..config import lazy_model_kwargs_from_yacs

        return lazy_model_kwargs_from_yacs(cfg)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a frozen BERT stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze_text_encoder:
            self.text_encoder.bert.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Checks and normalises each image; returns a list of [3, H, W] float RGB tensors."""
        stride = getattr(self.backbone, "size_divisibility", 32)
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
            image = image.to(self.device, torch.float32)
            if self.input_format == "BGR":
                image = image.flip(0)
            images.append((image - self.pixel_mean) / self.pixel_std)
        return images

    def _runs_for_input(self, index: int, record: Dict) -> List[PromptRun]:
        """Turns one input's prompt into passes of at most ``max_text_len`` tokens."""
        names = record.get("category_names")
        caption = record.get("caption")
        if names is not None and caption is not None:
            raise ValueError(f"Input {index}: give 'caption' or 'category_names', not both")
        if names is not None:
            if isinstance(names, str) or len(names) == 0:
                raise ValueError(f"Input {index}: 'category_names' must be a non-empty list")
            runs = []
            for group in chunk_categories(list(names), self.tokenizer, self.max_text_len):
                chunk_caption_text, spans = caption_from_categories([names[i] for i in group])
                tokenized = self.tokenizer(chunk_caption_text, return_offsets_mapping=True)
                positive_map = positive_map_from_spans(tokenized, spans, self.max_text_len)
                runs.append(PromptRun(index, chunk_caption_text, list(group), positive_map))
            return runs
        if caption is None:
            raise ValueError(f"Input {index}: no prompt; give 'caption' or 'category_names'")
        caption = normalize_caption(caption)
        runs, phrase_offset = [], 0
        # Chunks of a normalised caption end in "." and are normalised themselves.
        for text, _ in chunk_caption(caption, self.tokenizer, self.max_text_len):
            runs.append(PromptRun(index, text, phrase_offset=phrase_offset))
            phrase_offset += _count_separators(text)
        return runs

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Returns:
            in training, a dict of losses; otherwise a list with, for each input,
            ``{"instances": Instances, "phrases": [str]}``.
        """
        if self.training:
            return self.forward_training(batched_inputs)
        return self.inference(batched_inputs)

    def encode(self, images: List[torch.Tensor], runs: List[PromptRun]):
        """
        The backbone (once per image), the text encoder and the feature enhancer (per run).

        Returns:
            text: :class:`EncodedText` of the runs' captions (before enhancement).
            text_features: [R, L, C] enhanced text features.
            image: dict of the flattened image tensors (see :func:`flatten_levels`) plus
                ``memory`` [R, S, C], the enhanced image tokens.
        """
        features, masks, positions = self.backbone.forward_images(images)
        index = torch.tensor([run.image_index for run in runs], device=self.device)
        if len(runs) != len(images) or not torch.equal(index.cpu(), torch.arange(len(images))):
            features, masks, positions = (
                [t.index_select(0, index) for t in group] for group in (features, masks, positions)
            )
        text = self.text_encoder([run.caption for run in runs])
        image = flatten_levels(features, masks, positions)
        memory, text_features = self.enhancer(
            image["tokens"],
            image["pos"],
            image["mask"],
            image["spatial_shapes"],
            image["level_start_index"],
            image["valid_ratios"],
            text,
        )
        image["memory"] = memory
        return text, text_features, image

    def forward_transformer(
        self,
        images: List[torch.Tensor],
        runs: List[PromptRun],
        targets: Optional[List[Dict]] = None,
    ) -> Dict:
        """
        The whole network after preprocessing.

        Args:
            images: normalised [3, H, W] images.
            runs: one entry per pass (see :class:`PromptRun`).
            targets: training targets (see docs/interfaces.md); with ``dn_number > 0`` they
                also become contrastive denoising queries.

        Returns:
            dict with ``pred_logits`` [B, Q, max_text_len], ``pred_boxes`` [B, Q, 4],
            ``aux_outputs``, ``enc_outputs``, ``text_mask`` [B, max_text_len], ``input_ids``
            [B, L], and with denoising ``dn_outputs`` and ``dn_meta``.
        """
        text, text_features, image = self.encode(images, runs)
        queries, reference, enc_outputs = self.query_selector(
            image["memory"],
            image["mask"],
            image["spatial_shapes"],
            text_features,
            text.token_mask,
        )
        allowed = dn_meta = None
        if targets is not None and self.dn_number > 0:
            from .denoising import prepare_for_cdn

            dn_content, dn_reference, blocked, dn_meta = prepare_for_cdn(
                targets,
                text_features,
                text.token_mask,
                self.query_selector.num_queries,
                self.dn_number,
                self.dn_label_noise_ratio,
                self.dn_box_noise_scale,
            )
            if dn_content is not None:
                queries = torch.cat([dn_content, queries], 1)
                reference = torch.cat([dn_reference, reference], 1)
                allowed = ~blocked
        hidden, boxes = self.decoder(
            queries,
            reference,
            image["memory"],
            image["mask"],
            image["spatial_shapes"],
            image["level_start_index"],
            image["valid_ratios"],
            text_features,
            text.token_mask,
            allowed,
        )
        logits = [self.head(h, text_features, text.token_mask) for h in hidden]
        outputs = _split_outputs(logits, boxes, dn_meta if allowed is not None else None)
        text_mask = torch.zeros(len(runs), self.max_text_len, dtype=torch.bool, device=self.device)
        text_mask[:, : text.token_mask.shape[1]] = text.token_mask
        outputs.update(
            enc_outputs=enc_outputs, text_mask=text_mask, input_ids=text.input_ids, dn_meta=dn_meta
        )
        return outputs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        from ..config import apply_input_defaults

        batched_inputs = apply_input_defaults(batched_inputs, self.default_prompt, self.test_resize)
        images = self.preprocess_image(batched_inputs)
        runs = [run for i, x in enumerate(batched_inputs) for run in self._runs_for_input(i, x)]
        outputs = self.forward_transformer(images, runs)
        probs = outputs["pred_logits"].sigmoid()
        results = []
        for index, record in enumerate(batched_inputs):
            height = record.get("height", images[index].shape[1])
            width = record.get("width", images[index].shape[2])
            run_ids = [k for k, run in enumerate(runs) if run.image_index == index]
            candidates = [
                self._candidates(
                    runs[k], probs[k], outputs["pred_boxes"][k], outputs["input_ids"][k]
                )
                for k in run_ids
            ]
            results.append(self._merge_candidates(candidates, record, height, width))
        return results

    def _candidates(self, run: PromptRun, probs, boxes, input_ids) -> Dict:
        """
        Scores of one pass.

        Category prompts: category scores ``probs @ positive_map.T`` and the top
        ``max_detections`` (query, category) pairs, as the official COCO evaluation.
        Captions: the official ``predict``: a query's score is its best token score and its
        class is the phrase of that token.
        """
        length = int((input_ids != self.tokenizer.pad_token_id).sum())
        if run.category_indices is not None:
            category_scores = probs @ run.positive_map.to(probs).T  # [Q, C_run]
            flat = category_scores.flatten()
            k = min(self.max_detections, flat.numel())
            scores, flat_index = flat.topk(k)
            query_index = flat_index // category_scores.shape[1]
            classes = torch.tensor(run.category_indices, device=probs.device)[
                flat_index % category_scores.shape[1]
            ]
        else:
            scores = probs[:, :length].max(-1).values
            query_index = torch.arange(len(scores), device=probs.device)
            # The class is the phrase of the best word token ([CLS], [SEP], "." and "?"
            # belong to no phrase).
            is_word = _word_token_mask(input_ids[:length], self.tokenizer)
            token_index = probs[:, :length].masked_fill(~is_word, -1.0).argmax(-1)
            phrase_of_token = _phrase_index_of_tokens(input_ids[:length], self.tokenizer)
            classes = phrase_of_token[token_index] + run.phrase_offset
        keep = scores > self.box_threshold
        query_index = query_index[keep]
        return {
            "scores": scores[keep],
            "classes": classes[keep],
            "boxes": boxes[query_index],
            "token_scores": probs[query_index, :length],
            "input_ids": input_ids[:length],
            "run": run,
        }

    def _merge_candidates(self, candidates: List[Dict], record: Dict, height, width) -> Dict:
        scores = torch.cat([c["scores"] for c in candidates])
        order = scores.argsort(descending=True, stable=True)[: self.max_detections]
        max_length = max(c["token_scores"].shape[1] for c in candidates)
        token_scores = torch.cat(
            [
                nn.functional.pad(c["token_scores"], (0, max_length - c["token_scores"].shape[1]))
                for c in candidates
            ]
        )
        boxes = torch.cat([c["boxes"] for c in candidates])[order]
        cx, cy, w, h = boxes.unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        boxes = boxes * torch.tensor([width, height, width, height], device=boxes.device)
        instances = Instances((int(height), int(width)))
        instances.pred_boxes = Boxes(boxes)
        instances.pred_boxes.clip((int(height), int(width)))
        instances.scores = scores[order]
        instances.pred_classes = torch.cat([c["classes"] for c in candidates])[order]
        instances.token_scores = token_scores[order]
        phrases = self._phrases(candidates, record)
        return {"instances": instances, "phrases": [phrases[i] for i in order.tolist()]}

    def _phrases(self, candidates: List[Dict], record: Dict) -> List[str]:
        names = record.get("category_names")
        phrases: List[str] = []
        for candidate in candidates:
            if names is not None:
                phrases.extend(names[int(c)] for c in candidate["classes"])
            elif len(candidate["scores"]):
                phrases.extend(
                    phrases_from_token_scores(
                        candidate["token_scores"],
                        candidate["input_ids"],
                        self.tokenizer,
                        self.text_threshold,
                    )
                )
        return phrases

    # ------------------------------------------------------------------ training
    def forward_training(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        if self.criterion is None:
            raise ValueError("GroundingDINO was built without a criterion; cannot train")
        images = self.preprocess_image(batched_inputs)
        runs, targets = [], []
        for index, record in enumerate(batched_inputs):
            if "caption" not in record or "instances" not in record:
                raise ValueError(f"Training input {index} needs 'caption' and 'instances'")
            runs.append(PromptRun(index, normalize_caption(record["caption"])))
            targets.append(self._target(record["instances"], images[index].shape[1:]))
        outputs = self.forward_transformer(images, runs, targets)
        return self.criterion(outputs, targets, outputs.pop("dn_meta"))

    def _target(self, instances: Instances, image_size) -> Dict[str, torch.Tensor]:
        height, width = image_size
        boxes = instances.gt_boxes.tensor.to(self.device)
        x0, y0, x1, y1 = boxes.unbind(-1)
        normalised = torch.stack(
            [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height],
            -1,
        )
        positive_map = instances.gt_positive_map.to(self.device, torch.float32)
        if positive_map.shape[1] != self.max_text_len:
            raise ValueError(
                f"gt_positive_map has {positive_map.shape[1]} columns, expected "
                f"max_text_len={self.max_text_len}"
            )
        return {
            "boxes": normalised,
            "positive_map": positive_map,
            "labels": instances.gt_classes.to(self.device),
        }


def _freeze_swin_stages(backbone: nn.Module, last_stage: int) -> None:
    """Freezes the patch embedding and Swin stages 0..``last_stage`` of ``backbone.swin``."""
    swin = getattr(backbone, "swin", None)
    if swin is None:
        raise ValueError(
            f"freeze_backbone_stages needs a Swin backbone, got " f"{type(backbone).__name__}"
        )
    if last_stage >= len(swin.layers):
        raise ValueError(
            f"freeze_backbone_stages={last_stage} but Swin has " f"{len(swin.layers)} stages"
        )
    for module in [swin.patch_embed, *swin.layers[: last_stage + 1]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def _split_outputs(logits, boxes, dn_meta) -> Dict:
    """Splits per-layer decoder outputs into matching and denoising parts."""
    pad = dn_meta["pad_size"] if dn_meta else 0

    def layer(index, part):
        sl = slice(0, pad) if part == "dn" else slice(pad, None)
        return {"pred_logits": logits[index][:, sl], "pred_boxes": boxes[index][:, sl]}

    last = len(logits) - 1
    outputs = layer(last, "match")
    outputs["aux_outputs"] = [layer(i, "match") for i in range(last)]
    if pad:
        dn = layer(last, "dn")
        dn["aux_outputs"] = [layer(i, "dn") for i in range(last)]
        outputs["dn_outputs"] = dn
    return outputs


def flatten_levels(features, masks, positions) -> Dict[str, torch.Tensor]:
    """
    Flattens multi-scale maps into token sequences.

    Args:
        features, positions: lists of [B, C, H_l, W_l]; masks: list of [B, H_l, W_l] bool valid.

    Returns:
        dict: tokens [B, S, C], pos [B, S, C], mask [B, S], spatial_shapes [num_levels, 2],
        level_start_index [num_levels], valid_ratios [B, num_levels, 2] as (w, h).
    """
    shapes = [tuple(f.shape[-2:]) for f in features]
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=features[0].device)
    level_start_index = torch.cat(
        [spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]]
    )
    valid_ratios = torch.stack(
        [
            torch.stack([m[:, 0, :].sum(1) / m.shape[2], m[:, :, 0].sum(1) / m.shape[1]], -1)
            for m in masks
        ],
        1,
    ).to(features[0].dtype)
    return {
        "tokens": torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1),
        "pos": torch.cat([p.flatten(2).transpose(1, 2) for p in positions], 1),
        "mask": torch.cat([m.flatten(1) for m in masks], 1),
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "valid_ratios": valid_ratios,
    }


def _word_token_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True on tokens that are not [CLS], [SEP], [PAD], "." or "?"."""
    special = tokenizer.convert_tokens_to_ids([".", "?"]) + tokenizer.all_special_ids
    return ~torch.isin(input_ids, torch.tensor(special, device=input_ids.device))


def _phrase_index_of_tokens(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Index of the phrase each token belongs to: the number of "."/"?" tokens before it."""
    separators = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.convert_tokens_to_ids([".", "?"]):
        separators |= input_ids == token_id
    return torch.cumsum(separators.long(), 0) - separators.long()


def _count_separators(caption: str) -> int:
    """Number of "." and "?" in a caption: the tokens that close its phrases."""
    return caption.count(".") + caption.count("?")
