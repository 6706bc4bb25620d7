"""The dataset mapper: detectron2 dataset dicts (detection, grounding, REC) -> model inputs."""

import copy
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import get_event_storage

from ..io.images import read_image_file
from ..text import (
    PromptEncoder,
    caption_from_categories,
    category_token_costs,
    check_spans,
    clean_category_name,
    normalize_caption,
    normalize_caption_with_spans,
    swap_left_right,
)
from .transforms import count_hflips

__all__ = [
    "DROP_REASONS",
    "DropCounter",
    "GroundingDatasetMapper",
    "put_dropped_scalars",
    "record_kind",
]

logger = logging.getLogger(__name__)

# Why the training mapper drops an annotation: key in the mapped dict's "dropped" and in the
# training log (data/dropped_<key>) -> what the warning says.
DROP_REASONS = {
    "zero_area": "boxes with zero area or outside the image after the transforms",
    "past_token_limit": "objects whose phrase lies past the max_text_len-token limit",
    "category_overflow": "boxes whose category did not fit in the caption (max_text_len tokens "
    "or max_categories)",
}


def _record_name(dataset_dict: Dict) -> str:
    return f"image_id={dataset_dict.get('image_id')!r} ({dataset_dict.get('file_name')})"


def _prompt_encoder(tokenizer, max_text_len: int) -> PromptEncoder:
    if isinstance(tokenizer, PromptEncoder):
        if tokenizer.max_text_len != max_text_len:
            raise ValueError(
                f"The mapper's max_text_len={max_text_len} differs from its prompt encoder's "
                f"({tokenizer.max_text_len})"
            )
        return tokenizer
    if isinstance(tokenizer, str):
        return PromptEncoder(tokenizer_name_or_path=tokenizer, max_text_len=max_text_len)
    return PromptEncoder.from_tokenizer(tokenizer, max_text_len=max_text_len)


def record_kind(dataset_dict: Dict) -> str:
    """ "rec" (``task == "rec"``), "grounding" (has a caption) or "detection"."""
    if dataset_dict.get("task") == "rec":
        return "rec"
    return "grounding" if "caption" in dataset_dict else "detection"


class DropCounter:
    """
    Counts the annotations a training mapper drops, per reason of :data:`DROP_REASONS`, and
    warns about them: the first drop of a reason at once, then at most once per reason every
    ``period`` mapped images, with the counts so far and the boxes seen. Each DataLoader
    worker holds its own copy (its own counts); the mapped dicts' ``"dropped"`` field carries
    the counts to the training process (:func:`put_dropped_scalars`).
    """

    def __init__(self, period: int):
        if int(period) < 1:
            raise ValueError(f"drop_warning_period must be >= 1 image, got {period}")
        self.period = int(period)
        self.images = 0
        self.boxes = 0
        self.counts = {reason: 0 for reason in DROP_REASONS}
        self._warned_at: Dict[str, int] = {}  # reason -> images mapped at its last warning

    def update(self, num_boxes: int, dropped: Mapping[str, int], dataset_dict: Dict) -> None:
        """Adds one mapped image with ``num_boxes`` annotations and its ``dropped`` counts."""
        self.images += 1
        self.boxes += num_boxes
        if not dropped:
            return
        record = _record_name(dataset_dict)
        logger.debug(f"{record}: dropped {dict(dropped)} of {num_boxes} annotations")
        for reason, count in dropped.items():
            self.counts[reason] += count
            last = self._warned_at.get(reason)
            if last is None or self.images - last >= self.period:
                self._warned_at[reason] = self.images
                self._warn(reason, record)

    def _warn(self, reason: str, record: str) -> None:
        worker = torch.utils.data.get_worker_info()
        where = "" if worker is None else f" in data loader worker {worker.id}"
        totals = ", ".join(f"{r}={n}" for r, n in self.counts.items())
        logger.warning(
            f"GroundingDatasetMapper dropped {self.counts[reason]} training annotations so far "
            f"({reason}: {DROP_REASONS[reason]}; latest: {record}). All drops so far{where}: "
            f"{totals} of {self.boxes} boxes in {self.images} images. Reported at most every "
            f"{self.period} images per reason (drop_warning_period); the training log has "
            "data/dropped_*."
        )


def put_dropped_scalars(batch: Sequence[Dict], storage=None) -> Dict[str, int]:
    """
    Adds a training batch's drops to running totals in the event storage: scalars
    ``data/dropped_<reason>`` (:data:`DROP_REASONS`) and ``data/boxes_seen`` (kept + dropped
    annotations). The trainer calls it on each batch, so that the counts of DataLoader
    workers (other processes) reach the training log.

    Args:
        batch: mapped dicts of :class:`GroundingDatasetMapper` (training), each with
            "instances" and "dropped" ({reason: count}).
        storage: an :class:`EventStorage`; None: the active one, if any.

    Returns:
        The batch's counts {reason: n, "boxes_seen": n}; nothing is logged when no record has
        "dropped" (another mapper).
    """
    counts = {reason: 0 for reason in DROP_REASONS}
    counts["boxes_seen"] = 0
    for record in batch:
        dropped = record.get("dropped", {})
        for reason, n in dropped.items():
            counts[reason] += int(n)
        counts["boxes_seen"] += len(record.get("instances", ())) + sum(dropped.values())
    if not any("dropped" in record for record in batch):
        return counts
    if storage is None:
        try:
            storage = get_event_storage()
        except AssertionError:  # no storage active: nothing to log
            return counts
    latest = storage.latest()
    for name, n in counts.items():
        key = f"data/{name}" if name == "boxes_seen" else f"data/dropped_{name}"
        total = latest.get(key, (0, None))[0] + n
        storage.put_scalar(key, total, smoothing_hint=False)
    return counts


class GroundingDatasetMapper:
    """
    Maps detectron2 dataset dicts to Grounding DINO inputs (see docs/interfaces.md), in the
    way of detectron2's ``DatasetMapper``: read the image, apply the augmentations, and in
    training build the caption, the instances and their positive maps after the geometric
    transforms. Captions are tokenised once, by the model's :class:`PromptEncoder`; the ids go
    to the model as ``"input_ids"``.

    Three kinds of dicts are accepted:

    * detection (``annotations[*]["category_id"]`` indexes ``thing_classes``, or the record's
      own ``"thing_classes"`` when it has them, as records replayed from another dataset do):
      the caption names all categories present after the transforms plus randomly sampled
      negative categories while the caption fits ``max_text_len`` tokens;
    * grounding (``caption`` and ``annotations[*]["tokens_positive"]``);
    * REC (grounding with ``"task": "rec"`` and one annotation).

    When the image is flipped horizontally an odd number of times, "left" and "right" swap in
    the caption and the spans follow. Annotations dropped in training (see
    :data:`DROP_REASONS`) are counted in the mapped dict's ``"dropped"`` ({reason: n}) and
    reported by warnings (:class:`DropCounter`). In inference (``is_train=False``) annotations
    are dropped; detection dicts get ``"category_names"`` (all classes), the others a
    normalised ``"caption"``, and REC dicts their box as ``"gt_box"`` (xyxy, original pixels)
    for the REC evaluator.
    """

    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        tokenizer: Union[str, PromptEncoder, object],
        drop_warning_period: int,
        thing_classes: Optional[Sequence[str]] = None,
        image_format: str = "RGB",
        max_text_len: int = 256,
        shuffle_categories: bool = True,
        max_categories: Optional[int] = None,
        swap_left_right_on_flip: bool = True,
    ):
        """
        Args:
            is_train: training (annotations, captions, positive maps) or inference.
            augmentations: e.g. ``build_train_augmentations()`` / ``build_test_augmentations()``.
            tokenizer: the model's tokenizer: its hub name / local folder (the model's
                ``prompt_encoder.tokenizer_name_or_path``), a loaded fast tokenizer, or the
                model's :class:`PromptEncoder` (then its ``max_text_len`` must be
                ``max_text_len``).
            drop_warning_period: in training, warn about dropped annotations at most once per
                reason every this many mapped images (the first drop at once).
            thing_classes: category names of detection datasets (metadata ``thing_classes``).
            image_format: "RGB" (the model's) or "BGR", for
                :func:`~grounding_dino.io.images.read_image_file`.
            max_text_len: token limit of captions (256).
            shuffle_categories: shuffle category order in detection captions (training).
            max_categories: at most this many categories per detection caption (Open-
                GroundingDino's ``max_labels`` = 80); None: as many as fit.
            swap_left_right_on_flip: swap "left"/"right" in captions of flipped images.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format {image_format!r}: 'RGB' or 'BGR'")
        self.image_format = image_format
        self.prompt_encoder = _prompt_encoder(tokenizer, max_text_len)
        self.thing_classes = (
            None if thing_classes is None else [clean_category_name(str(c)) for c in thing_classes]
        )
        self.max_text_len = max_text_len
        self.shuffle_categories = shuffle_categories
        if max_categories is not None and (
            isinstance(max_categories, bool)
            or not isinstance(max_categories, (int, np.integer))
            or max_categories < 1
        ):
            raise ValueError(
                f"max_categories must be a positive integer or None (no limit), got "
                f"{max_categories!r}; on the command line, write "
                "dataloader.train.mapper.max_categories=null for no limit"
            )
        self.max_categories = max_categories
        self.swap_left_right_on_flip = swap_left_right_on_flip
        self._class_costs: Dict[Tuple[str, ...], List[int]] = {}
        self._own_classes: Dict[Tuple[str, ...], List[str]] = {}
        self.drops = DropCounter(drop_warning_period)
        if self.thing_classes is not None:
            caption_from_categories(self.thing_classes)  # validates the names
        mode = "training" if is_train else "inference"
        logger.info(f"[GroundingDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @property
    def tokenizer(self):
        """The prompt encoder's (fast) tokenizer."""
        return self.prompt_encoder.tokenizer

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: one record in detectron2 format (see docs/interfaces.md).

        Returns:
            The model input dict: "image" uint8 [3, H, W], "height", "width", the prompt
            ("caption" or "category_names"), and in training "instances" (gt_boxes,
            gt_classes, gt_positive_map [N, max_text_len]), "tokens_positive" and
            "input_ids" (list of ints: the caption's whole tokenisation, [CLS] ... [SEP]; the
            model cuts it at ``max_text_len`` tokens as the positive maps are).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        kind = record_kind(dataset_dict)
        # the one reader of every entry point: EXIF orientation, 16-bit, palette, CMYK... and
        # a message naming the file for what cannot be read (see grounding_dino.io.images)
        image = read_image_file(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        annotations = None
        boxes = None
        if self.is_train:
            annotations = [a for a in dataset_dict.pop("annotations", []) if not a.get("iscrowd")]
            boxes = np.zeros((len(annotations), 4), dtype=np.float32)
            for i, anno in enumerate(annotations):
                boxes[i] = BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            annotations = dataset_dict.pop("annotations", None)
            if kind == "rec" and annotations:  # for the REC evaluator: original pixels, xyxy
                box = annotations[0]
                dataset_dict["gt_box"] = BoxMode.convert(
                    list(box["bbox"]), box["bbox_mode"], BoxMode.XYXY_ABS
                )
            if kind == "detection":
                dataset_dict["category_names"] = list(self._require_classes(dataset_dict))
            else:
                dataset_dict["caption"] = self._caption_of(dataset_dict)
            return dataset_dict

        keep = self._valid_boxes(aug_input.boxes, image_shape)
        dropped = {"zero_area": int((~keep).sum())}
        flipped = self.swap_left_right_on_flip and count_hflips(transforms) % 2 == 1
        if kind == "detection":
            with_area = int(keep.sum())
            caption, spans, classes, keep = self._detection_prompt(annotations, keep, dataset_dict)
            dropped["category_overflow"] = with_area - int(keep.sum())
        else:
            caption, spans, classes = self._grounding_prompt(annotations, kind, dataset_dict)
        if flipped:
            caption, spans = swap_left_right(caption, spans)
        boxes = aug_input.boxes[keep]
        spans = [spans[i] for i in np.flatnonzero(keep)]
        classes = [classes[i] for i in np.flatnonzero(keep)]

        encoding = self.prompt_encoder.tokenize(caption)
        positive_map = self.prompt_encoder.positive_map(caption, spans, encoding)
        grounded = (positive_map > 0).any(dim=1)
        dropped["past_token_limit"] = int((~grounded).sum())
        dropped = {reason: n for reason, n in dropped.items() if n}
        self.drops.update(len(annotations), dropped, dataset_dict)
        grounded_list = grounded.tolist()
        instances = Instances(image_shape)
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[grounded.numpy()], dtype=torch.float32))
        instances.gt_classes = torch.as_tensor(
            [c for c, g in zip(classes, grounded_list) if g], dtype=torch.long
        )
        instances.gt_positive_map = positive_map[grounded]
        dataset_dict["caption"] = caption
        dataset_dict["input_ids"] = list(encoding["input_ids"])
        dataset_dict["instances"] = instances
        dataset_dict["tokens_positive"] = [
            [[int(b), int(e)] for b, e in s] for s, g in zip(spans, grounded_list) if g
        ]
        dataset_dict["dropped"] = dropped
        return dataset_dict

    # ---------------------------------------------------------------------------------------
    def _require_classes(self, dataset_dict: Dict) -> List[str]:
        own = dataset_dict.get("thing_classes")
        if own is not None:  # a record replayed from another dataset (data/replay.py)
            return self._record_classes(tuple(own))
        if self.thing_classes is None:
            raise ValueError(
                f"{_record_name(dataset_dict)} is a detection record (no caption) but the "
                "mapper was built without thing_classes"
            )
        return self.thing_classes

    def _caption_of(self, dataset_dict: Dict) -> str:
        caption = dataset_dict.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{_record_name(dataset_dict)} has an empty caption: {caption!r}")
        return normalize_caption(caption)

    @staticmethod
    def _valid_boxes(boxes: np.ndarray, image_shape) -> np.ndarray:
        """Clips boxes to the image; returns the mask of boxes with positive area."""
        height, width = image_shape
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    def _record_classes(self, names: Tuple[str, ...]) -> List[str]:
        """A record's own category names, cleaned for prompts (cached per list)."""
        if names not in self._own_classes:
            cleaned = [clean_category_name(str(c)) for c in names]
            caption_from_categories(cleaned)  # validates the names
            self._own_classes[names] = cleaned
        return self._own_classes[names]

    def _costs(self, names: List[str]) -> List[int]:
        """Tokens each category of ``names`` adds to a detection caption (its words and " ."),
        cached per list of names."""
        key = tuple(names)
        if key not in self._class_costs:
            self._class_costs[key] = category_token_costs(names, self.tokenizer)
        return self._class_costs[key]

    def _detection_prompt(
        self, annotations: List[Dict], keep: np.ndarray, dataset_dict: Dict
    ) -> Tuple[str, List, List[int], np.ndarray]:
        names = self._require_classes(dataset_dict)
        for i, anno in enumerate(annotations):
            category = anno.get("category_id")
            if not isinstance(category, (int, np.integer)) or not 0 <= category < len(names):
                raise ValueError(
                    f"{_record_name(dataset_dict)}: annotation {i} has category_id "
                    f"{category!r}, not in [0, {len(names)})"
                )
        costs = self._costs(names)
        budget = self.max_text_len - 2
        limit = self.max_categories or len(names)
        positives = sorted({int(a["category_id"]) for a, k in zip(annotations, keep) if k})
        chosen, used = [], 0
        for c in np.random.permutation(positives).tolist() if positives else []:
            if used + costs[c] <= budget and len(chosen) < limit:
                chosen.append(c)
                used += costs[c]
        positive_set = set(chosen)
        for c in np.random.permutation(len(names)).tolist():
            if len(chosen) >= limit:
                break
            if c not in positive_set and used + costs[c] <= budget:
                chosen.append(c)
                used += costs[c]
        if not chosen:
            raise ValueError(
                f"{_record_name(dataset_dict)}: no category name fits in {self.max_text_len} "
                "tokens"
            )
        if self.shuffle_categories:
            np.random.shuffle(chosen)
        else:
            chosen.sort()
        caption, category_spans = caption_from_categories([names[c] for c in chosen])
        index_of = {c: i for i, c in enumerate(chosen)}
        keep = keep & np.array(
            [int(a["category_id"]) in index_of for a in annotations], dtype=bool
        ).reshape(-1)
        spans = [category_spans[index_of.get(int(a["category_id"]), 0)] for a in annotations]
        classes = [index_of.get(int(a["category_id"]), -1) for a in annotations]
        return caption, spans, classes, keep

    def _grounding_prompt(
        self, annotations: List[Dict], kind: str, dataset_dict: Dict
    ) -> Tuple[str, List, List[int]]:
        raw_caption = dataset_dict.get("caption")
        if not isinstance(raw_caption, str) or not raw_caption.strip():
            raise ValueError(f"{_record_name(dataset_dict)} has an empty caption: {raw_caption!r}")
        if kind == "rec" and len(annotations) != 1:
            raise ValueError(
                f"{_record_name(dataset_dict)} is a REC record with {len(annotations)} "
                "annotations; REC records have exactly one"
            )
        spans = []
        for i, anno in enumerate(annotations):
            tokens_positive = anno.get("tokens_positive")
            if not tokens_positive:
                raise ValueError(
                    f"{_record_name(dataset_dict)}: annotation {i} has no tokens_positive"
                )
            spans.append([tuple(s) for s in tokens_positive])
        check_spans(raw_caption, spans, what=_record_name(dataset_dict))
        caption, spans = normalize_caption_with_spans(raw_caption, spans)
        # One class per phrase (phrase_id, else identical spans), numbered in caption order.
        keys = [
            ("id", anno["phrase_id"]) if "phrase_id" in anno else ("spans", tuple(span))
            for anno, span in zip(annotations, spans)
        ]
        first_char = {}
        for key, span in zip(keys, spans):
            first_char[key] = min(first_char.get(key, len(caption)), min(b for b, _ in span))
        order = sorted(first_char, key=lambda k: (first_char[k], str(k)))
        index_of = {key: i for i, key in enumerate(order)}
        return caption, spans, [index_of[key] for key in keys]
