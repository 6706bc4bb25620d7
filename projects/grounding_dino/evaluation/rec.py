"""Referring expression comprehension (RefCOCO/+/g) evaluation.

Each input is one expression with one ground-truth box; the model's highest-scoring box is its
answer. Reported, in percent, overall and per split:

* ``Acc@0.5``: the top-1 box has IoU >= 0.5 with the ground truth (the paper's metric);
* ``P@1``, ``P@5``, ``P@10``: any of the k highest-scoring boxes has IoU >= 0.5 (MDETR's
  "precision@k"; ``P@1`` equals ``Acc@0.5``).
"""

import copy
import itertools
import logging
from collections import OrderedDict

import detectron2.utils.comm as comm
import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

from .records import check_ranking_args, dump_records, group_by_split

__all__ = ["RECEvaluator", "gt_box_from_input"]


def gt_box_from_input(input):
    """The ground-truth box of one REC input, as XYXY_ABS.

    Args:
        input (dict): has either ``"gt_box"`` (4 numbers, xyxy in original-image pixels) or
            the dataset dict's ``"annotations"`` whose first entry has ``"bbox"`` and
            ``"bbox_mode"``.

    Returns:
        Tensor: float [4], xyxy.
    """
    if "gt_box" in input:
        box = torch.as_tensor(input["gt_box"], dtype=torch.float32).flatten()
    elif input.get("annotations"):
        ann = input["annotations"][0]
        if "bbox" not in ann or "bbox_mode" not in ann:
            raise ValueError(
                f"REC input image_id={input.get('image_id')}: annotations[0] needs 'bbox' and "
                f"'bbox_mode' (has {sorted(ann.keys())})."
            )
        box = torch.as_tensor(
            BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS),
            dtype=torch.float32,
        ).flatten()
    else:
        raise ValueError(
            f"REC input image_id={input.get('image_id')} carries no ground-truth box: give it "
            "'gt_box' (xyxy) or 'annotations' with one 'bbox' and 'bbox_mode'."
        )
    if box.numel() != 4:
        raise ValueError(
            f"REC input image_id={input.get('image_id')}: ground-truth box must have 4 numbers, "
            f"got {box.numel()}."
        )
    return box


class RECEvaluator(DatasetEvaluator):
    """Top-1 accuracy and precision@k of referring expression comprehension.

    Results: ``{"rec": {"Acc@0.5", "P@1", "P@5", "P@10", "<split>/Acc@0.5", ...}}``.
    """

    def __init__(
        self,
        dataset_name=None,
        output_dir=None,
        *,
        distributed=True,
        topk=(1, 5, 10),
        iou_threshold=0.5,
    ):
        """
        Args:
            dataset_name (str or None): for log messages only.
            output_dir (str or None): where to write ``rec_predictions.json`` (top-k IoUs of
                each expression).
            distributed (bool): gather records from all ranks to the main process.
            topk (tuple[int]): the k of the reported P@k.
            iou_threshold (float): IoU a box needs to count as correct.
        """
        topk = check_ranking_args(topk, iou_threshold)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._topk = topk
        self._iou_threshold = iou_threshold
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        """
        Args:
            inputs (list[dict]): one expression each; ground truth as in
                :func:`gt_box_from_input`; optional ``"split"`` (str).
            outputs (list[dict]): each has ``"instances"`` with ``pred_boxes`` (xyxy, original
                pixels, [N, 4]) and ``scores`` [N].
        """
        max_k = max(self._topk)
        for input, output in zip(inputs, outputs):
            gt = gt_box_from_input(input)
            if "instances" not in output:
                raise ValueError(
                    f"RECEvaluator: the output for image_id={input.get('image_id')} has no "
                    "'instances'."
                )
            instances = output["instances"].to(torch.device("cpu"))
            order = torch.argsort(instances.scores, descending=True, stable=True)[:max_k]
            boxes = Boxes(instances.pred_boxes.tensor[order].float())
            ious = pairwise_iou(boxes, Boxes(gt[None])).flatten()
            self._records.append(
                {
                    "image_id": input.get("image_id"),
                    "split": input.get("split"),
                    "ious": ious.tolist(),  # IoU of the top-k boxes, best score first
                }
            )

    def evaluate(self):
        """Gather and score on the main process (others return ``{}``)."""
        if self._distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(self._records, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            records = self._records
        if len(records) == 0:
            self._logger.warning("[RECEvaluator] Did not receive valid predictions.")
            return {}

        dump_records(records, self._output_dir, "rec_predictions.json")

        groups = group_by_split(records)

        results = OrderedDict()
        rows = []
        for split, group in groups.items():
            metrics = self._metrics(group)
            prefix = "" if split is None else f"{split}/"
            results.update((prefix + k, v) for k, v in metrics.items())
            rows.append(["all" if split is None else split, len(group)] + list(metrics.values()))
        overall = self._metrics(records)
        table = tabulate(
            rows,
            headers=["split", "#expr"] + list(overall.keys()),
            tablefmt="pipe",
            floatfmt=".2f",
            numalign="left",
        )
        name = self._dataset_name or "REC"
        self._logger.info(f"REC results on {name}: \n" + create_small_table(overall) + "\n" + table)
        return copy.deepcopy({"rec": results})

    def _metrics(self, records):
        """Acc@thr and P@k in percent over ``records``."""
        hits = np.zeros((len(records), max(self._topk)), dtype=bool)
        for i, r in enumerate(records):
            ious = np.asarray(r["ious"], dtype=np.float64)
            hits[i, : len(ious)] = ious >= self._iou_threshold
        cum = np.logical_or.accumulate(hits, axis=1)  # any hit among the first k boxes
        metrics = OrderedDict()
        metrics[f"Acc@{self._iou_threshold:g}"] = float(cum[:, 0].mean() * 100)
        for k in self._topk:
            metrics[f"P@{k}"] = float(cum[:, k - 1].mean() * 100)
        return metrics
