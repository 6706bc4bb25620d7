"""Post-processing of Grounding DINO: token scores and boxes -> detections with phrases.

Every scoring rule of the project lives here, chosen by the prompt and the
:class:`~grounding_dino.modeling.settings.InferenceSettings` of the call:

* category prompts (``"category_names"``): a box's score for a category is its token scores
  averaged through the category's positive map (``probs @ positive_map.T``), and the top
  ``max_detections`` (query, category) pairs are kept, as the official COCO evaluation;
* captions with token spans (``"token_spans"``, the official ``--token_spans``): the same rule
  with the caption's selected phrases as the categories;
* captions: the official ``predict()``: a box's score is its best token score, its class the
  phrase of its best word token, its phrase the tokens above ``text_threshold``;
* REC mode (``settings.rec``): the single best box of the caption whatever its score, with the
  whole expression as its phrase.

Long prompts run in several passes ("runs", see ``PromptEncoder.runs_for_input``); the
candidates of an image's runs are merged, best first, optionally through class-wise NMS.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

from .nms import classwise_nms
from .settings import InferenceSettings

__all__ = [
    "detections_for_inputs",
    "grounding_postprocess",
    "run_candidates",
    "merge_candidates",
    "prompt_class_names",
]


def prompt_class_names(record: Dict) -> Optional[List[str]]:
    """
    The names of a model input's classes: its ``"category_names"``, or for a caption with
    ``"token_spans"`` each phrase's text (its spans joined by spaces); None for a free caption.
    """
    if record.get("category_names") is not None:
        return list(record["category_names"])
    spans = record.get("token_spans")
    if spans is None:
        return None
    caption = record["caption"]
    return [" ".join(caption[beg:end] for beg, end in phrase) for phrase in spans]


def detections_for_inputs(
    batched_inputs: Sequence[Dict],
    image_sizes: Sequence[Tuple[int, int]],
    logits: torch.Tensor,
    boxes: torch.Tensor,
    runs: Sequence,
    prompt_encoder,
    settings: InferenceSettings,
) -> List[Dict]:
    """
    The detections of a batch of model inputs from the raw outputs of their runs (the part of
    inference after the network, shared by the PyTorch model and the ONNX Runtime predictor).

    Args:
        batched_inputs: the model inputs (their ``"height"``, ``"width"``, ``"caption"``,
            ``"category_names"`` and ``"token_spans"`` are read).
        image_sizes: per input, the (height, width) of the image the network saw; boxes are
            returned in ``"height"`` x ``"width"`` pixels, by default this size.
        logits: [R, Q, max_text_len] token logits of the R runs (-inf past each caption).
        boxes: [R, Q, 4] sigmoid cx, cy, w, h, normalised by the image size.
        runs: the R runs (``preprocessing.runs_for_inputs``).
        prompt_encoder: the model's ``PromptEncoder``.
        settings: the thresholds, detection budget, NMS and REC mode of this call.

    Returns:
        per input, ``{"instances": Instances, "phrases": [str]}`` (see
        :func:`grounding_postprocess`).
    """
    output_sizes = [
        (record.get("height", height), record.get("width", width))
        for record, (height, width) in zip(batched_inputs, image_sizes)
    ]
    results = grounding_postprocess(
        logits.sigmoid(),
        boxes,
        runs,
        [prompt_class_names(record) for record in batched_inputs],
        output_sizes,
        prompt_encoder,
        settings,
    )
    if settings.rec:
        for record, result in zip(batched_inputs, results):
            if record.get("caption") is not None and record.get("token_spans") is None:
                expression = record["caption"].strip()
                result["phrases"] = [expression] * len(result["instances"])
    return results


def grounding_postprocess(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    runs: Sequence,
    class_names: Sequence[Optional[Sequence[str]]],
    output_sizes: Sequence[Tuple[int, int]],
    prompt_encoder,
    settings: InferenceSettings,
) -> List[Dict]:
    """
    Detections of each image from the outputs of its runs.

    Args:
        probs: [R, Q, max_text_len] token probabilities (sigmoid of the logits), one row per
            run.
        boxes: [R, Q, 4] sigmoid cx, cy, w, h, normalised by the image size.
        runs: the R ``PromptRun`` s (``image_index``, ``input_ids``, ``category_indices``,
            ``positive_map``, ``phrase_offset``).
        class_names: per image, its class names (category or token-span prompt, see
            :func:`prompt_class_names`) or None (caption).
        output_sizes: per image, the (height, width) to return boxes in.
        prompt_encoder: the model's ``PromptEncoder`` (word tokens, phrase indices, phrases).
        settings: see :class:`InferenceSettings`.

    Returns:
        per image, ``{"instances": Instances(pred_boxes (xyxy pixels, clipped), scores,
        pred_classes, token_scores [N, L]), "phrases": [str] * N}``, best score first.
    """
    results = []
    for index, (names, (height, width)) in enumerate(zip(class_names, output_sizes)):
        candidates = [
            run_candidates(run, probs[k], boxes[k], prompt_encoder, settings, names)
            for k, run in enumerate(runs)
            if run.image_index == index
        ]
        results.append(merge_candidates(candidates, int(height), int(width), settings))
    return results


def run_candidates(
    run,
    probs: torch.Tensor,
    boxes: torch.Tensor,
    prompt_encoder,
    settings: InferenceSettings,
    class_names: Optional[Sequence[str]],
) -> Dict:
    """
    The detections of one run above the settings' box threshold.

    Args:
        run: a ``PromptRun``.
        probs: [Q, max_text_len] token probabilities of the run's queries.
        boxes: [Q, 4] normalised cxcywh boxes.
        prompt_encoder, settings: as :func:`grounding_postprocess`.
        class_names: the image's class names for category and token-span runs, else None.

    Returns:
        dict with ``scores`` [N], ``classes`` [N] (global category index, or phrase index in
        the whole caption), ``boxes`` [N, 4] cxcywh, ``token_scores`` [N, L_run] and
        ``phrases`` (N strings).
    """
    max_detections = settings.candidates_per_run
    # (A run's ids pass max_text_len only for captions with the mapper's ids, cut by the model.)
    input_ids = torch.as_tensor(run.input_ids[: probs.shape[1]], device=probs.device)
    token_probs = probs[:, : len(input_ids)]
    if run.category_indices is not None:
        category_scores = probs @ run.positive_map.to(probs).T  # [Q, C_run]
        flat = category_scores.flatten()
        scores, flat_index = flat.topk(min(max_detections, flat.numel()))
        query_index = flat_index // category_scores.shape[1]
        categories = torch.as_tensor(run.category_indices, device=probs.device)
        classes = categories[flat_index % category_scores.shape[1]]
    else:
        scores = token_probs.max(-1).values
        query_index = torch.arange(len(scores), device=probs.device)
        # The class is the phrase of the best word token ([CLS], [SEP], "." and "?" belong to
        # no phrase).
        is_word = prompt_encoder.word_token_mask(input_ids)
        token_index = token_probs.masked_fill(~is_word, -1.0).argmax(-1)
        phrase_index = prompt_encoder.phrase_index_of_tokens(input_ids)
        classes = phrase_index[token_index] + run.phrase_offset
    keep = scores > settings.effective_box_threshold
    query_index, classes = query_index[keep], classes[keep]
    token_scores = token_probs[query_index]
    if run.category_indices is not None:
        phrases = [class_names[int(c)] for c in classes]
    elif len(token_scores):
        phrases = prompt_encoder.phrases(token_scores, input_ids, settings.text_threshold)
    else:
        phrases = []
    return {
        "scores": scores[keep],
        "classes": classes,
        "boxes": boxes[query_index],
        "token_scores": token_scores,
        "phrases": phrases,
    }


def merge_candidates(
    candidates: List[Dict], height: int, width: int, settings: InferenceSettings
) -> Dict:
    """
    Merges the candidates of an image's runs: boxes converted to xyxy pixels of (height,
    width) and clipped (as detectron2's ``detector_postprocess``), class-wise NMS when the
    settings ask for it, then the best ``max_detections``.

    Returns:
        ``{"instances": Instances, "phrases": [str]}``.
    """
    scores = torch.cat([c["scores"] for c in candidates])
    classes = torch.cat([c["classes"] for c in candidates])
    length = max(c["token_scores"].shape[1] for c in candidates)
    token_scores = torch.cat(
        [F.pad(c["token_scores"], (0, length - c["token_scores"].shape[1])) for c in candidates]
    )
    cx, cy, w, h = torch.cat([c["boxes"] for c in candidates]).unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    boxes = Boxes(boxes * torch.tensor([width, height, width, height], device=boxes.device))
    boxes.clip((height, width))
    order = classwise_nms(
        boxes.tensor,
        scores,
        classes,
        settings.effective_nms_threshold,
        settings.effective_max_detections,
    )
    instances = Instances((height, width))
    instances.pred_boxes = boxes[order]
    instances.scores = scores[order]
    instances.pred_classes = classes[order]
    instances.token_scores = token_scores[order]
    phrases = [phrase for c in candidates for phrase in c["phrases"]]
    return {"instances": instances, "phrases": [phrases[i] for i in order.tolist()]}
