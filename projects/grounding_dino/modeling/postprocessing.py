"""Post-processing of Grounding DINO: token scores and boxes -> detections with phrases.

Two kinds of prompts, as the official code:

* category prompts (``"category_names"``): a box's score for a category is its token scores
  averaged through the category's positive map (``probs @ positive_map.T``), and the top
  ``max_detections`` (query, category) pairs are kept, as the official COCO evaluation;
* captions: the official ``predict()``: a box's score is its best token score, its class the
  phrase of its best word token, its phrase the tokens above ``text_threshold``.

Long prompts run in several passes ("runs", see ``PromptEncoder.runs_for_input``); the
candidates of an image's runs are merged, best first.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

__all__ = [
    "runs_for_inputs",
    "detections_for_inputs",
    "grounding_postprocess",
    "run_candidates",
    "merge_candidates",
]


def runs_for_inputs(prompt_encoder, batched_inputs: Sequence[Dict]) -> List:
    """
    The transformer passes of a batch of model inputs (the first half of inference that every
    runtime shares: the PyTorch model and the ONNX Runtime predictor).

    Args:
        prompt_encoder: the model's ``PromptEncoder``.
        batched_inputs: model inputs, each with ``"caption"`` or ``"category_names"``.

    Returns:
        the ``PromptRun`` s of all inputs in order (a long prompt gives several, with the
        input's index as ``image_index``).
    """
    return [
        run
        for index, record in enumerate(batched_inputs)
        for run in prompt_encoder.runs_for_input(index, record)
    ]


def detections_for_inputs(
    batched_inputs: Sequence[Dict],
    image_sizes: Sequence[Tuple[int, int]],
    logits: torch.Tensor,
    boxes: torch.Tensor,
    runs: Sequence,
    prompt_encoder,
    *,
    box_threshold: float,
    text_threshold: float,
    max_detections: int,
) -> List[Dict]:
    """
    The detections of a batch of model inputs from the raw outputs of their runs (the second
    half of inference that every runtime shares).

    Args:
        batched_inputs: the model inputs (their ``"height"``, ``"width"`` and
            ``"category_names"`` are read).
        image_sizes: per input, the (height, width) of the image the network saw; boxes are
            returned in ``"height"`` x ``"width"`` pixels, by default this size.
        logits: [R, Q, max_text_len] token logits of the R runs (-inf past each caption).
        boxes: [R, Q, 4] sigmoid cx, cy, w, h, normalised by the image size.
        runs: the R runs (:func:`runs_for_inputs`).
        prompt_encoder, box_threshold, text_threshold, max_detections: as
            :func:`grounding_postprocess`.

    Returns:
        per input, ``{"instances": Instances, "phrases": [str]}`` (see
        :func:`grounding_postprocess`).
    """
    output_sizes = [
        (record.get("height", height), record.get("width", width))
        for record, (height, width) in zip(batched_inputs, image_sizes)
    ]
    return grounding_postprocess(
        logits.sigmoid(),
        boxes,
        runs,
        [record.get("category_names") for record in batched_inputs],
        output_sizes,
        prompt_encoder,
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        max_detections=max_detections,
    )


def grounding_postprocess(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    runs: Sequence,
    category_names: Sequence[Optional[Sequence[str]]],
    output_sizes: Sequence[Tuple[int, int]],
    prompt_encoder,
    *,
    box_threshold: float,
    text_threshold: float,
    max_detections: int,
) -> List[Dict]:
    """
    Detections of each image from the outputs of its runs.

    Args:
        probs: [R, Q, max_text_len] token probabilities (sigmoid of the logits), one row per
            run.
        boxes: [R, Q, 4] sigmoid cx, cy, w, h, normalised by the image size.
        runs: the R ``PromptRun`` s (``image_index``, ``input_ids``, ``category_indices``,
            ``positive_map``, ``phrase_offset``).
        category_names: per image, its class names (category prompt) or None (caption).
        output_sizes: per image, the (height, width) to return boxes in.
        prompt_encoder: the model's ``PromptEncoder`` (word tokens, phrase indices, phrases).
        box_threshold, text_threshold, max_detections: see ``GroundingDINO``.

    Returns:
        per image, ``{"instances": Instances(pred_boxes (xyxy pixels, clipped), scores,
        pred_classes, token_scores [N, L]), "phrases": [str] * N}``, best score first.
    """
    results = []
    for index, (names, (height, width)) in enumerate(zip(category_names, output_sizes)):
        candidates = [
            run_candidates(
                run,
                probs[k],
                boxes[k],
                prompt_encoder,
                box_threshold=box_threshold,
                text_threshold=text_threshold,
                max_detections=max_detections,
                category_names=names,
            )
            for k, run in enumerate(runs)
            if run.image_index == index
        ]
        results.append(merge_candidates(candidates, int(height), int(width), max_detections))
    return results


def run_candidates(
    run,
    probs: torch.Tensor,
    boxes: torch.Tensor,
    prompt_encoder,
    *,
    box_threshold: float,
    text_threshold: float,
    max_detections: int,
    category_names: Optional[Sequence[str]],
) -> Dict:
    """
    The detections of one run above ``box_threshold``.

    Args:
        run: a ``PromptRun``.
        probs: [Q, max_text_len] token probabilities of the run's queries.
        boxes: [Q, 4] normalised cxcywh boxes.
        prompt_encoder, box_threshold, text_threshold, max_detections: as
            :func:`grounding_postprocess`.
        category_names: the image's class names for category runs, else None.

    Returns:
        dict with ``scores`` [N], ``classes`` [N] (global category index, or phrase index in
        the whole caption), ``boxes`` [N, 4] cxcywh, ``token_scores`` [N, L_run] and
        ``phrases`` (N strings).
    """
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
    keep = scores > box_threshold
    query_index, classes = query_index[keep], classes[keep]
    token_scores = token_probs[query_index]
    if run.category_indices is not None:
        phrases = [category_names[int(c)] for c in classes]
    elif len(token_scores):
        phrases = prompt_encoder.phrases(token_scores, input_ids, text_threshold)
    else:
        phrases = []
    return {
        "scores": scores[keep],
        "classes": classes,
        "boxes": boxes[query_index],
        "token_scores": token_scores,
        "phrases": phrases,
    }


def merge_candidates(candidates: List[Dict], height: int, width: int, max_detections: int):
    """
    Merges the candidates of an image's runs: the best ``max_detections``, boxes converted to
    xyxy pixels of (height, width) and clipped (as detectron2's ``detector_postprocess``).

    Returns:
        ``{"instances": Instances, "phrases": [str]}``.
    """
    scores = torch.cat([c["scores"] for c in candidates])
    order = scores.argsort(descending=True, stable=True)[:max_detections]
    length = max(c["token_scores"].shape[1] for c in candidates)
    token_scores = torch.cat(
        [F.pad(c["token_scores"], (0, length - c["token_scores"].shape[1])) for c in candidates]
    )
    cx, cy, w, h = torch.cat([c["boxes"] for c in candidates])[order].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    boxes = boxes * torch.tensor([width, height, width, height], device=boxes.device)
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(boxes)
    instances.pred_boxes.clip((height, width))
    instances.scores = scores[order]
    instances.pred_classes = torch.cat([c["classes"] for c in candidates])[order]
    instances.token_scores = token_scores[order]
    phrases = [phrase for c in candidates for phrase in c["phrases"]]
    return {"instances": instances, "phrases": [phrases[i] for i in order.tolist()]}
