"""Zero-shot detection evaluators: COCO-style AP (COCO, ODinW) and LVIS AP (standard or fixed).

The model is prompted with the dataset's category names and returns, per image, at most a few
hundred ``Instances`` whose ``pred_classes`` index ``metadata.thing_classes`` (the official
COCO evaluation keeps the top 300 of ``prob @ posmap.T`` over query x category). These
evaluators only score those instances; they reuse detectron2's ``COCOEvaluator`` and
``LVISEvaluator`` for the bookkeeping, gathering and the pycocotools / lvis API calls.
"""

import contextlib
import io
import json
import logging
import os
from collections import defaultdict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from pycocotools.coco import COCO

__all__ = ["ZeroShotDetectionEvaluator", "ZeroShotLVISEvaluator", "keep_topk_per_class"]

logger = logging.getLogger(__name__)


def _check_output(evaluator_name, image_id, output, num_classes):
    """Validate one model output and return its ``Instances`` on the CPU.

    Args:
        evaluator_name (str): name used in error messages.
        image_id: the image's id (for error messages).
        output (dict): one model output; must hold ``"instances"`` with ``pred_boxes``
            (Boxes [N, 4] xyxy), ``scores`` [N] and ``pred_classes`` [N].
        num_classes (int or None): number of dataset categories; classes must lie in
            ``[0, num_classes)``.

    Returns:
        Instances: the instances moved to the CPU.
    """
    if "instances" not in output:
        raise ValueError(
            f"{evaluator_name}: the output for image_id={image_id} has no 'instances' "
            f"(keys: {sorted(output.keys())})."
        )
    instances = output["instances"]
    if not isinstance(instances, Instances):
        raise TypeError(
            f"{evaluator_name}: output['instances'] for image_id={image_id} is a "
            f"{type(instances).__name__}, expected detectron2.structures.Instances."
        )
    for field in ("pred_boxes", "scores", "pred_classes"):
        if not instances.has(field):
            raise ValueError(
                f"{evaluator_name}: output['instances'] for image_id={image_id} lacks the "
                f"field '{field}'."
            )
    instances = instances.to(torch.device("cpu"))
    classes = instances.pred_classes
    if num_classes is not None and len(classes) > 0:
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{evaluator_name}: image_id={image_id} has pred_classes in [{low}, {high}], "
                f"but the dataset has {num_classes} categories (valid range [0, "
                f"{num_classes - 1}]); pred_classes must index metadata.thing_classes."
            )
    return instances


def _topk_by_score(instances, k):
    """Keep the ``k`` highest-scoring instances (all of them when ``k`` is None or < 0)."""
    if k is None or k < 0 or len(instances) <= k:
        return instances
    order = torch.argsort(instances.scores, descending=True, stable=True)[:k]
    return instances[order]


def keep_topk_per_class(predictions, k):
    """Keep, for every category, its ``k`` highest-scoring detections across all images.

    This is the per-class budget of the fixed AP protocol (Dave et al., "Evaluating
    Large-Vocabulary Object Detectors: The Devil is in the Details", 2021): no per-image
    limit, at most ``k`` detections per class over the whole dataset.

    Args:
        predictions (list[dict]): ``{"image_id", "instances": list[COCO-json dict]}`` per
            image, as produced by ``instances_to_coco_json``.
        k (int): detections kept per category.

    Returns:
        list[dict]: the same images (same order), each with only its surviving detections.
    """
    if k <= 0:
        raise ValueError(f"keep_topk_per_class: k must be positive, got {k}.")
    per_class = defaultdict(list)  # category -> [(score, image index, detection index)]
    for img_idx, pred in enumerate(predictions):
        for det_idx, det in enumerate(pred.get("instances", [])):
            per_class[det["category_id"]].append((det["score"], img_idx, det_idx))
    kept = set()
    for dets in per_class.values():
        dets.sort(key=lambda d: -d[0])
        kept.update((img_idx, det_idx) for _, img_idx, det_idx in dets[:k])
    out = []
    for img_idx, pred in enumerate(predictions):
        pred = dict(pred)
        pred["instances"] = [
            det
            for det_idx, det in enumerate(pred.get("instances", []))
            if (img_idx, det_idx) in kept
        ]
        out.append(pred)
    return out


def _ensure_category_mapping(metadata, json_file):
    """Give the metadata ``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` if missing.

    ``load_coco_json`` sets them only when the dataset is loaded; an evaluator may be built
    before that. The values are the ones ``load_coco_json`` would set (categories sorted by id).
    """
    if metadata.get("thing_dataset_id_to_contiguous_id") is not None:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        coco_api = COCO(PathManager.get_local_path(json_file))
    cat_ids = sorted(coco_api.getCatIds())
    if not cat_ids:
        raise ValueError(f"{json_file} has no 'categories'; cannot evaluate detection AP.")
    names = [c["name"] for c in coco_api.loadCats(cat_ids)]
    if metadata.get("thing_classes") is None:
        metadata.thing_classes = names
    elif len(metadata.thing_classes) != len(cat_ids):
        raise ValueError(
            f"metadata.thing_classes of '{metadata.name}' has {len(metadata.thing_classes)} "
            f"names but {json_file} has {len(cat_ids)} categories."
        )
    metadata.thing_dataset_id_to_contiguous_id = {cid: i for i, cid in enumerate(cat_ids)}


class ZeroShotDetectionEvaluator(COCOEvaluator):
    """COCO box AP, and mask AP with the mask stage, of zero-shot (category-prompted) detections.

    Works for any COCO-format dataset registered in detectron2 (COCO, ODinW's datasets...).
    Results: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<category>"...}}``
    in percent, logged as tables. At most ``max_dets_per_image`` detections per image (the
    highest-scoring ones) are scored, and COCOeval's ``maxDets`` is set to the same value.

    When the outputs carry masks (the mask stage is on: ``output["mask_instances"]`` from
    :class:`~grounding_dino.evaluation.masks.InferenceWithMasks`, or ``pred_masks`` on
    ``output["instances"]``), the results also hold ``"segm"`` (the same metrics on the masks,
    against the json's ``segmentation``); the mask results are written to
    ``coco_segm_results.json`` beside ``coco_instances_results.json``.
    """

    def __init__(
        self,
        dataset_name,
        output_dir=None,
        *,
        distributed=True,
        max_dets_per_image=300,
        use_fast_impl=True,
        allow_cached_coco=True,
    ):
        """
        Args:
            dataset_name (str): a registered COCO-format dataset (``metadata.json_file``) or
                any detectron2 detection dataset (then converted, ``output_dir`` required).
            output_dir (str or None): where to dump predictions and COCO-format results.
            distributed (bool): gather predictions from all ranks to the main process.
            max_dets_per_image (int): detections kept per image and COCOeval ``maxDets``.
            use_fast_impl (bool): detectron2's C++ COCOeval when ``maxDets`` is 100 (with any
                other limit detectron2 uses the official Python COCOeval).
            allow_cached_coco (bool): reuse a converted COCO json from an earlier run.
        """
        if max_dets_per_image <= 0:
            raise ValueError(f"max_dets_per_image must be positive, got {max_dets_per_image}.")
        super().__init__(
            dataset_name,
            tasks=("bbox",),
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=use_fast_impl,
            allow_cached_coco=allow_cached_coco,
        )
        self._dataset_name = dataset_name
        self._max_dets = max_dets_per_image
        _ensure_category_mapping(self._metadata, self._metadata.json_file)
        self._num_classes = len(self._metadata.thing_classes)

    def process(self, inputs, outputs):
        """
        Args:
            inputs (list[dict]): model inputs; each has ``"image_id"``.
            outputs (list[dict]): model outputs; each has ``"instances"`` (``pred_boxes`` xyxy
                in original pixels [N, 4], ``scores`` [N], ``pred_classes`` [N] indexing
                ``metadata.thing_classes``).
        """
        _collect_predictions(self, inputs, outputs)

    def _eval_predictions(self, predictions, img_ids=None):
        """Box AP on every image's detections, then mask AP on their masks when they have
        some (``"segm_instances"``, from :func:`_collect_predictions`)."""
        self._tasks = ("bbox",)
        super()._eval_predictions(predictions, img_ids=img_ids)
        with_masks = sum("segm_instances" in p for p in predictions)
        if not with_masks:
            return
        if with_masks != len(predictions):
            raise ValueError(
                f"{type(self).__name__}: {with_masks} of {len(predictions)} images have masks; "
                "the mask AP needs masks for every image (the mask stage on for all of them)"
            )
        _check_gt_masks(self._coco_api, self._metadata.json_file)
        segm = [{"image_id": p["image_id"], "instances": p["segm_instances"]} for p in predictions]
        output_dir, self._output_dir, self._tasks = self._output_dir, None, ("segm",)
        try:
            super()._eval_predictions(segm, img_ids=img_ids)
        finally:
            self._output_dir, self._tasks = output_dir, ("bbox",)
        if output_dir:
            path = os.path.join(output_dir, "coco_segm_results.json")
            with PathManager.open(path, "w") as f:
                json.dump([r for p in segm for r in p["instances"]], f)


def _check_gt_masks(coco_api, json_file) -> None:
    """Raises when an annotation of ``json_file`` has no ``segmentation`` (no mask AP)."""
    missing = [
        a["id"] for a in coco_api.dataset.get("annotations", []) if not a.get("segmentation")
    ]
    if missing:
        raise ValueError(
            f"{json_file}: {len(missing)} annotation(s) have no 'segmentation' (ids "
            f"{missing[:5]}...), so mask (segm) AP cannot be computed; evaluate without the mask "
            "stage or add the masks to the json"
        )


def _without_masks(instances: Instances) -> Instances:
    fields = {k: v for k, v in instances.get_fields().items() if k != "pred_masks"}
    return Instances(instances.image_size, **fields)


def _collect_predictions(evaluator, inputs, outputs) -> None:
    """Checks each output, keeps its top ``evaluator._max_dets`` and stores it as COCO json;
    the detections with masks (``output["mask_instances"]``, else ``instances.pred_masks``)
    also as COCO json with RLE ``segmentation`` (``"segm_instances"``)."""
    name = type(evaluator).__name__
    for input, output in zip(inputs, outputs):
        if "image_id" not in input:
            raise ValueError(f"{name}: an input dict has no 'image_id'.")
        image_id = input["image_id"]
        instances = _check_output(name, image_id, output, evaluator._num_classes)
        instances = _topk_by_score(instances, evaluator._max_dets)
        masked = output.get("mask_instances")
        if masked is None and instances.has("pred_masks"):
            masked = instances
        prediction = {
            "image_id": image_id,
            "instances": instances_to_coco_json(_without_masks(instances), image_id),
        }
        if masked is not None:
            masked = _check_output(name, image_id, {"instances": masked}, evaluator._num_classes)
            if not masked.has("pred_masks"):
                raise ValueError(f"{name}: output['mask_instances'] of {image_id} has no masks")
            masked = _topk_by_score(masked, evaluator._max_dets)
            prediction["segm_instances"] = instances_to_coco_json(masked, image_id)
        evaluator._predictions.append(prediction)


@contextlib.contextmanager
def _lvis_numpy_compat():
    """Let lvis 0.5.3 (latest on PyPI) run on NumPy >= 1.24.

    Its ``LVISEval.accumulate`` uses the removed alias ``np.float`` (fixed upstream in
    lvis-dataset/lvis-api#39, not released). The alias is restored to ``float`` only for the
    duration of the evaluation and removed again afterwards.
    """
    added = "float" not in np.__dict__
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


class ZeroShotLVISEvaluator(LVISEvaluator):
    """LVIS box AP of zero-shot detections, standard or fixed.

    * standard (``fixed_ap=False``): at most ``max_dets_per_image`` (300) detections per
      image, as the LVIS API defines AP.
    * fixed (``fixed_ap=True``): no per-image limit; for every category only the
      ``topk_per_class`` (10000) highest-scoring detections over the whole dataset are kept
      (AP-fixed of Dave et al. 2021). The model should then return more than 300
      detections per image for the numbers to be meaningful.

    Results: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}}``
    in percent; a metric with no ground truth (e.g. no rare category) is NaN.
    """

    def __init__(
        self,
        dataset_name,
        output_dir=None,
        *,
        distributed=True,
        max_dets_per_image=300,
        fixed_ap=False,
        topk_per_class=10000,
    ):
        """
        Args:
            dataset_name (str): a registered LVIS-format dataset (``metadata.json_file``).
            output_dir (str or None): where to dump predictions and LVIS-format results.
            distributed (bool): gather predictions from all ranks to the main process.
            max_dets_per_image (int): per-image limit of the standard protocol.
            fixed_ap (bool): use the fixed AP protocol instead.
            topk_per_class (int): per-category budget over the dataset for fixed AP.
        """
        metadata = MetadataCatalog.get(dataset_name)
        if metadata.get("json_file") is None:
            raise ValueError(
                f"Dataset '{dataset_name}' has no metadata.json_file; the LVIS evaluator needs "
                "the LVIS-format annotation json."
            )
        if fixed_ap and topk_per_class <= 0:
            raise ValueError(f"topk_per_class must be positive, got {topk_per_class}.")
        if not fixed_ap and max_dets_per_image <= 0:
            raise ValueError(f"max_dets_per_image must be positive, got {max_dets_per_image}.")
        super().__init__(
            dataset_name,
            tasks=("bbox",),
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=-1 if fixed_ap else max_dets_per_image,
        )
        self._fixed_ap = fixed_ap
        self._topk_per_class = topk_per_class
        self._max_dets = -1 if fixed_ap else max_dets_per_image
        num_classes = len(self._lvis_api.get_cat_ids())
        thing_classes = self._metadata.get("thing_classes")
        if thing_classes is not None and len(thing_classes) != num_classes:
            raise ValueError(
                f"metadata.thing_classes of '{dataset_name}' has {len(thing_classes)} names but "
                f"{self._metadata.json_file} has {num_classes} categories."
            )
        self._num_classes = num_classes

    def process(self, inputs, outputs):
        """Same contract as :meth:`ZeroShotDetectionEvaluator.process`."""
        _collect_predictions(self, inputs, outputs)

    def evaluate(self):
        """Gather, score on the main process (others return ``{}``)."""
        if self._fixed_ap:
            # The global per-class top-k is contained in the union of the local ones.
            self._predictions = keep_topk_per_class(self._predictions, self._topk_per_class)
        results = super().evaluate()
        return results if results is not None else {}

    def _eval_predictions(self, predictions):
        if self._fixed_ap:
            predictions = keep_topk_per_class(predictions, self._topk_per_class)
            self._logger.info(
                f"Fixed AP: top {self._topk_per_class} detections per category over the "
                "dataset, no per-image limit."
            )
        with _lvis_numpy_compat():
            super()._eval_predictions(predictions)
        for task, res in self._results.items():
            missing = [key for key, value in res.items() if value < 0]
            if missing:  # lvis reports -1 where a metric has no ground truth
                res.update((key, float("nan")) for key in missing)
                self._logger.info(
                    f"{task}: {missing} have no ground truth and are NaN: \n"
                    + create_small_table(res)
                )
