"""
Output checks of ``tools/benchmark.py``: our predictor against transformers' model on the same
image and caption, the drift of another run (bf16) from the fp32 one, and the detections of
two runtimes (PyTorch, ONNX Runtime) on the same input.

Only public API is used: the predictor's call with its ``settings`` and its output
``Instances``, and forward hooks on two components of the
documented model tree (``model.enhancer``: (image tokens, text features);
``model.query_selector``: (queries, reference, enc_outputs)).
"""

import math
from typing import Dict

import numpy as np
import torch

__all__ = [
    "TOKEN_TOL",
    "BOX_TOL_PX",
    "check_outputs",
    "format_check",
    "drift",
    "compare_detections",
]

TOKEN_TOL = 1e-4
BOX_TOL_PX = 0.05


def _tensor(value, field: str) -> torch.Tensor:
    """The tensor of a typed component output (``ImageTokens.tokens``...) or the tensor itself."""
    return getattr(value, field, value)


def _pixel_boxes(cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised cx, cy, w, h [N, 4] -> xyxy pixels clipped to the image, as the predictor."""
    cx, cy, w, h = cxcywh.unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.stack(
        [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height)]
        + [boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)],
        -1,
    )


def check_outputs(hf, ours, image_bgr: np.ndarray, caption: str) -> Dict:
    """
    Runs both pipelines on the same uint8 image and caption with every query kept, and matches
    each of transformers' queries to our closest detection (box and token scores, each in
    units of its tolerance); our detections come sorted by score, transformers' queries in
    query order.

    The query selection is a top-k over the image tokens: with random weights, two tokens can
    score within fp32 rounding of each other, and then the two implementations may order them
    differently, which gives those queries other content embeddings. The check therefore also
    compares the continuous part before the selection (the enhanced image and text features)
    and counts the top-k ranks whose proposal boxes differ: when only the order of such near
    ties differs, it reports that instead of failing.

    Args:
        hf: a :class:`~grounding_dino.comparison.reference.HFPipeline`.
        ours: a ``GroundingDINOPredictor`` whose resize leaves ``image_bgr`` as it is.
        image_bgr: uint8 [H, W, 3].
        caption: the text prompt.

    Returns:
        dict with ``token_diff`` (max token score difference of matched queries),
        ``box_diff_px`` (max box coordinate difference, pixels), ``queries_unmatched``,
        ``encoder_diff`` (max difference of the enhanced features) and
        ``topk_ranks_differ``.

    Raises:
        AssertionError: when the outputs differ by more than 1e-4 / 0.05 px and the
            difference is not explained by a top-k order of equal encoder outputs.
    """
    inputs = hf.preprocess(image_bgr, caption)
    captured = {}
    model = ours.model
    hooks = [
        model.enhancer.register_forward_hook(
            lambda module, args, output: captured.update(
                image=_tensor(output[0], "tokens"), text=_tensor(output[1], "features")
            )
        ),
        model.query_selector.register_forward_hook(
            lambda module, args, output: captured.update(proposals=output[2]["pred_boxes"])
        ),
    ]
    num_queries = hf.model.config.num_queries
    try:
        every_query = ours.settings.replace(box_threshold=-math.inf, max_detections=num_queries)
        with torch.no_grad():
            ref = hf.model(**inputs)
            out = ours(image_bgr, caption, settings=every_query)["instances"].to("cpu")
    finally:
        for hook in hooks:
            hook.remove()

    height, width = image_bgr.shape[:2]
    length = inputs["input_ids"].shape[1]
    ref_tokens = ref.logits[0, :, :length].sigmoid()  # [Q, L]
    ref_boxes = _pixel_boxes(ref.pred_boxes[0], height, width)  # [Q, 4]
    our_tokens = out.token_scores[:, :length].float()
    our_boxes = out.pred_boxes.tensor.float()
    if len(out) != num_queries or our_tokens.shape[1] != length:
        raise AssertionError(
            f"with every query kept, the predictor returned {len(out)} detections with "
            f"{our_tokens.shape[1]} token scores; expected {num_queries} x {length}"
        )
    # Distances of every (transformers query, our detection) pair, in units of the tolerances.
    box_distance = (ref_boxes[:, None] - our_boxes[None]).abs().amax(-1)  # [Q_ref, Q_ours]
    token_distance = torch.cdist(ref_tokens, our_tokens, p=float("inf"))  # [Q_ref, Q_ours]
    nearest = torch.maximum(box_distance / BOX_TOL_PX, token_distance / TOKEN_TOL).argmin(1)
    box_diff = box_distance.gather(1, nearest[:, None]).squeeze(1)
    token_diff = token_distance.gather(1, nearest[:, None]).squeeze(1)
    unmatched = (box_diff >= BOX_TOL_PX) | (token_diff >= TOKEN_TOL)
    encoder_diff = max(
        float((captured["image"] - ref.encoder_last_hidden_state_vision).abs().max()),
        float((captured["text"] - ref.encoder_last_hidden_state_text).abs().max()),
    )
    rank_diff = (captured["proposals"] - ref.encoder_pred_boxes).abs().amax(-1)
    result = {
        "token_diff": float(token_diff.max()),
        "box_diff_px": float(box_diff.max()),
        "queries_unmatched": int(unmatched.sum()),
        "encoder_diff": encoder_diff,
        "topk_ranks_differ": int((rank_diff > 1e-4).sum()),
    }
    if result["queries_unmatched"] == 0:
        return result
    if encoder_diff < TOKEN_TOL and result["topk_ranks_differ"] > 0:
        return result  # equal up to the order of near-tied top-k scores (see above)
    raise AssertionError(f"outputs differ: {result}")


def format_check(check: Dict) -> str:
    """The lines ``tools/benchmark.py`` prints about :func:`check_outputs`."""
    lines = [
        f"Enhanced features equal: max diff {check['encoder_diff']:.2e}; final outputs: max "
        f"token score diff {check['token_diff']:.2e}, max box diff {check['box_diff_px']:.2e} px"
    ]
    if check["queries_unmatched"]:
        lines.append(
            f"Note: the query selection ordered {check['topk_ranks_differ']} of its top-k "
            "ranks differently (scores tied within fp32 rounding in this random model), so "
            f"{check['queries_unmatched']} final queries have no equal counterpart"
        )
    else:
        lines.append(f"Outputs equal (token scores {TOKEN_TOL:g}, boxes {BOX_TOL_PX:g} px)")
    return "\n".join(lines)


def drift(fp32: Dict, other: Dict) -> Dict[str, float]:
    """
    How far one predictor output is from the fp32 one: each fp32 detection is matched to
    the other output's box of highest IoU.

    Returns:
        detection counts, the fraction of fp32 detections matched at IoU >= 0.9, the mean
        IoU of the matches and the largest score difference among the matched pairs.
    """
    from detectron2.structures import pairwise_iou

    a, b = fp32["instances"], other["instances"]
    result = {"detections_fp32": len(a), "detections_other": len(b)}
    if len(a) and len(b):
        iou, match = pairwise_iou(a.pred_boxes, b.pred_boxes).max(1)
        good = iou >= 0.9
        result["matched_iou0.9"] = round(float(good.float().mean()), 4)
        result["mean_iou"] = round(float(iou.mean()), 4)
        if good.any():
            diff = (a.scores[good] - b.scores[match[good]].float()).abs().max()
            result["max_score_diff"] = round(float(diff), 5)
    return result


def compare_detections(ours: Dict, other: Dict) -> Dict:
    """Detections of two runtimes on the same input: counts, whether phrases and classes are
    equal, and the largest score and box (px) differences when the counts agree."""
    a, b = ours["instances"], other["instances"]
    result = {"count": len(a), "other_count": len(b)}
    if len(a) == len(b):
        result["same_phrases"] = ours["phrases"] == other["phrases"]
        result["same_classes"] = bool(torch.equal(a.pred_classes, b.pred_classes))
        if len(a):
            result["max_score_diff"] = float((a.scores - b.scores).abs().max())
            result["max_box_diff_px"] = float(
                (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()
            )
    return result
