"""Flickr30k entities phrase grounding: Recall@k of each phrase, as MDETR's ``flickr_eval.py``.

A caption's phrases are grounded at once: the model is prompted with the whole caption and
returns boxes with per-token scores (``token_scores``). For each phrase, every returned box is
scored by its highest token score over the phrase's tokens (MDETR's ``PostProcessFlickr``:
``max(positive_map * prob)``) and the boxes are ranked by that score. A phrase is a hit at k
when one of its k best boxes has IoU >= 0.5 with one of the phrase's ground-truth boxes.

Ground-truth protocols (MDETR's ``GT_type``):

* "any box" (``merge_boxes=False``, MDETR's default, ``configs/flickr.json``: ``"separate"``):
  the phrase's boxes stay separate; matching any of them is a hit;
* "merged" (``merge_boxes=True``): the phrase's boxes are replaced by their enclosing box.

The phrases are those of ``tokens_positive_eval`` (one per mention of an entity that has boxes,
as MDETR's annotation files give them), else the distinct spans of the annotations; a phrase's
ground truth is every box whose ``tokens_positive`` holds one of its spans.
"""

import copy
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence

import detectron2.utils.comm as comm
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

from ..text import (
    PromptEncoder,
    check_spans,
    load_tokenizer,
    normalize_caption_with_spans,
    positive_map_from_spans,
)
from ..text.tokenizer import check_fast
from .records import check_ranking_args, dump_records, group_by_split

__all__ = ["Flickr30kEvaluator", "flickr_phrases", "recall_at_k"]


def flickr_phrases(record: Dict, merge_boxes: bool) -> Dict:
    """
    The evaluated phrases of one caption record and their ground-truth boxes.

    Args:
        record (dict): a grounding dataset dict (``caption``, ``annotations`` with ``bbox``,
            ``bbox_mode``, ``tokens_positive``; optionally ``tokens_positive_eval``).
        merge_boxes (bool): replace each phrase's boxes by their enclosing box.

    Returns:
        dict with ``caption`` (normalised), ``spans`` (per phrase, its ``[beg, end)`` spans in
        the normalised caption) and ``boxes`` (per phrase, float array [G, 4] xyxy in the
        original image's pixels).

    Raises:
        ValueError: naming the image id when the record has no caption or a phrase has no box.
    """
    where = f"image_id={record.get('image_id')!r} ({record.get('file_name')})"
    caption = record.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"Flickr30k record {where} has no caption")
    annotations = [a for a in record.get("annotations", []) if a.get("tokens_positive")]
    ann_spans = [{(int(b), int(e)) for b, e in a["tokens_positive"]} for a in annotations]
    ann_boxes = [
        BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations
    ]
    phrases = record.get("tokens_positive_eval")
    if phrases is None:
        phrases = [[list(s)] for s in sorted(set().union(*ann_spans))] if ann_spans else []
    phrases = [[(int(b), int(e)) for b, e in phrase] for phrase in phrases]
    check_spans(caption, phrases, what=f"Flickr30k record {where}")
    boxes = []
    for phrase in phrases:
        gt = [box for box, spans in zip(ann_boxes, ann_spans) if spans.intersection(phrase)]
        if not gt:
            text = " / ".join(caption[b:e] for b, e in phrase)
            raise ValueError(
                f"Flickr30k record {where}: the phrase {text!r} ({phrase}) has no box whose "
                "tokens_positive holds its span"
            )
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        if merge_boxes:
            gt = np.concatenate([gt[:, :2].min(0), gt[:, 2:].max(0)])[None]
        boxes.append(gt)
    normalized, spans = normalize_caption_with_spans(caption, phrases)
    return {"caption": normalized, "spans": spans, "boxes": boxes}


def recall_at_k(ious: Sequence[Sequence[float]], topk: Sequence[int], iou_threshold: float):
    """
    Recall@k in percent.

    Args:
        ious: per query (phrase or expression), the best IoU with its ground truth of each of
            its ranked boxes, best-ranked first (any length, possibly empty).
        topk: the k to report.
        iou_threshold: IoU a box needs to be a hit.

    Returns:
        OrderedDict ``{k: percent of queries with a hit among their first k boxes}``.
    """
    hits = np.zeros((len(ious), max(topk)), dtype=bool)
    for i, row in enumerate(ious):
        row = np.asarray(row, dtype=np.float64)[: hits.shape[1]]
        hits[i, : len(row)] = row >= iou_threshold
    cumulative = np.logical_or.accumulate(hits, axis=1)
    return OrderedDict((k, float(cumulative[:, k - 1].mean() * 100)) for k in topk)


def _fast_tokenizer(tokenizer):
    if isinstance(tokenizer, PromptEncoder):
        return tokenizer.tokenizer
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    check_fast(tokenizer)
    return tokenizer


class Flickr30kEvaluator(DatasetEvaluator):
    """
    Recall@1/5/10 of Flickr30k entities phrase grounding (MDETR's protocol, see the module).

    Inputs are the mapped captions (``image_id``; an optional ``"split"`` groups results); the
    ground truth is read from the registered dataset by ``image_id``. Outputs need
    ``instances`` with ``pred_boxes`` and ``token_scores`` [N, T] (the model's scores of the
    caption's T tokens): run the model with ``model.box_threshold=0`` so that all queries are
    returned and R@10 has ten boxes to look at.

    Results: ``{"flickr30k": {"R@1", "R@5", "R@10", "<split>/R@1", ...}}`` in percent.
    """

    def __init__(
        self,
        dataset_name,
        output_dir=None,
        *,
        tokenizer,
        distributed=True,
        topk=(1, 5, 10),
        iou_threshold=0.5,
        merge_boxes=False,
    ):
        """
        Args:
            dataset_name (str): a registered dataset of caption records (``register_mdetr``).
            output_dir (str or None): where to write ``flickr30k_predictions.json`` (the IoUs
                of each phrase's top-k boxes).
            tokenizer: the model's tokenizer: hub name or folder
                (``model.prompt_encoder.tokenizer_name_or_path``), a fast tokenizer or the
                model's ``PromptEncoder``; it maps phrases to the caption's tokens.
            distributed (bool): gather results from all ranks to the main process.
            topk (tuple[int]): the k of the reported R@k.
            iou_threshold (float): IoU a box needs to count as a hit.
            merge_boxes (bool): "merged" ground truth instead of MDETR's default "any box".
        """
        topk = check_ranking_args(topk, iou_threshold)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._tokenizer = _fast_tokenizer(tokenizer)
        self._distributed = distributed
        self._topk = topk
        self._iou_threshold = iou_threshold
        self._merge_boxes = merge_boxes
        self._logger = logging.getLogger(__name__)
        self._ground_truth = None  # image_id -> dataset record, read on first use
        self._phrases = {}  # image_id -> flickr_phrases(record)
        self.reset()

    def reset(self):
        self._records = []
        self._seen = []  # image ids of the captions processed (with or without phrases)

    def _phrases_of(self, image_id) -> Dict:
        """The phrases of a caption (:func:`flickr_phrases`), from the registered dataset."""
        if self._ground_truth is None:
            self._ground_truth = {r["image_id"]: r for r in DatasetCatalog.get(self._dataset_name)}
        if image_id not in self._phrases:
            if image_id not in self._ground_truth:
                raise KeyError(
                    f"Flickr30kEvaluator: image_id={image_id!r} is not a record of dataset "
                    f"'{self._dataset_name}'."
                )
            record = self._ground_truth[image_id]
            self._phrases[image_id] = flickr_phrases(record, self._merge_boxes)
        return self._phrases[image_id]

    def process(self, inputs, outputs):
        """
        Args:
            inputs (list[dict]): the mapped captions; each has ``"image_id"``.
            outputs (list[dict]): each has ``"instances"`` with ``pred_boxes`` (xyxy, original
                pixels, [N, 4]) and ``token_scores`` [N, T] over the caption's T tokens.
        """
        max_k = max(self._topk)
        for input, output in zip(inputs, outputs):
            image_id = input.get("image_id")
            phrases = self._phrases_of(image_id)
            self._seen.append(image_id)
            instances = output.get("instances")
            if instances is None or not instances.has("token_scores"):
                raise ValueError(
                    f"Flickr30kEvaluator: the output for image_id={image_id!r} needs "
                    "'instances' with 'token_scores' (the model's caption token scores)."
                )
            instances = instances.to(torch.device("cpu"))
            scores, positive = self._phrase_scores(
                image_id, phrases, instances.token_scores.float()
            )
            boxes = instances.pred_boxes.tensor.float()
            for index, gt in enumerate(phrases["boxes"]):
                order = torch.argsort(scores[:, index], descending=True, stable=True)[:max_k]
                ious = pairwise_iou(Boxes(boxes[order]), Boxes(torch.as_tensor(gt).float()))
                self._records.append(
                    {
                        "image_id": image_id,
                        "split": input.get("split"),
                        "phrase": index,
                        "num_tokens": int(positive[index].sum()),
                        "ious": ious.max(dim=1).values.tolist(),
                    }
                )

    def _phrase_scores(self, image_id, phrases: Dict, token_scores: torch.Tensor):
        """
        Returns:
            [N, P] score of each box for each phrase (its best token score over the phrase's
            tokens) and the [P, T] bool map of the phrases' tokens.
        """
        caption = phrases["caption"]
        encoding = self._tokenizer(caption, return_offsets_mapping=True)
        num_tokens = len(encoding["input_ids"])
        if token_scores.shape[1] != num_tokens:
            raise ValueError(
                f"Flickr30kEvaluator: image_id={image_id!r}: token_scores has "
                f"{token_scores.shape[1]} columns but the caption {caption!r} has {num_tokens} "
                "tokens: the evaluator's tokenizer is not the model's, or the caption was longer "
                "than the model's max_text_len and was split."
            )
        positive = positive_map_from_spans(encoding, phrases["spans"], num_tokens, caption) > 0
        if len(token_scores) == 0:
            return token_scores.new_zeros((0, len(positive))), positive
        scores = (token_scores[:, None, :] * positive[None].to(token_scores)).amax(dim=-1)
        return scores, positive

    def evaluate(self):
        """Gather and score on the main process (others return ``{}``)."""
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((self._records, self._seen), dst=0)
            if not comm.is_main_process():
                return {}
            records = list(itertools.chain(*(r for r, _ in gathered)))
            seen = set(itertools.chain(*(s for _, s in gathered)))
        else:
            records, seen = self._records, set(self._seen)
        if len(records) == 0:
            self._logger.warning("[Flickr30kEvaluator] Did not receive valid predictions.")
            return {}

        dump_records(records, self._output_dir, "flickr30k_predictions.json")
        self._report_coverage(records, seen)

        groups = group_by_split(records)
        results = OrderedDict()
        rows = []
        for split, group in groups.items():
            recalls = recall_at_k([r["ious"] for r in group], self._topk, self._iou_threshold)
            prefix = "" if split is None else f"{split}/"
            results.update((f"{prefix}R@{k}", v) for k, v in recalls.items())
            rows.append(["all" if split is None else split, len(group)] + list(recalls.values()))
        headers = ["split", "#phrases"] + [f"R@{k}" for k in self._topk]
        table = tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f", numalign="left")
        protocol = "merged" if self._merge_boxes else "any box"
        overall = OrderedDict((k, v) for k, v in results.items() if "/" not in k)
        self._logger.info(
            f"Flickr30k results on {self._dataset_name} ({protocol} protocol): \n"
            + create_small_table(overall)
            + "\n"
            + table
        )
        return copy.deepcopy({"flickr30k": results})

    def _report_coverage(self, records: List[Dict], seen: set) -> None:
        """Warns about captions not evaluated, phrases without tokens (their boxes keep the
        model's order) and phrases with fewer than max(topk) boxes."""
        max_k = max(self._topk)
        untokenized = sum(r["num_tokens"] == 0 for r in records)
        if untokenized:
            self._logger.warning(
                f"[Flickr30kEvaluator] {untokenized} of {len(records)} phrases cover no token of "
                "their caption (a span that the tokenizer cannot place): their boxes are ranked "
                "by the model's order"
            )
        short = sum(len(r["ious"]) < max_k for r in records)
        if short:
            self._logger.warning(
                f"[Flickr30kEvaluator] {short} of {len(records)} phrases had fewer than {max_k} "
                f"boxes to rank (their missing ranks count as misses); set "
                "model.box_threshold=0 so that every query is returned."
            )
        if self._ground_truth is None:  # this process saw no input: read the dataset's size
            self._ground_truth = {r["image_id"]: r for r in DatasetCatalog.get(self._dataset_name)}
        total = len(self._ground_truth)
        if len(seen) < total:
            self._logger.warning(
                f"[Flickr30kEvaluator] evaluated {len(seen)} of the {total} captions of "
                f"'{self._dataset_name}'; the recall is over those only."
            )
