"""
Sharding and the labelling worker.

``label_worker`` runs in every process started by :func:`grounding_dino.engine.launch`
(detectron2's ``launch`` on GPUs, gloo processes on the CPU). The images still to do are
dealt round-robin over the global ranks (``todo[rank::world_size]``); each process reads its
share through the image DataLoader, runs the model on batches and appends every finished image
to its own part file. The processes never wait for each other.
"""

import logging
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.utils import comm

from ..io.coco_files import error_record, label_record
from ..io.images import build_image_loader
from ..io.parts import PartWriter
from ..model_zoo import load_config
from ..modeling.settings import InferenceSettings
from ..predictor import GroundingDINOPredictor

__all__ = ["shard", "label_worker", "label_batch", "labelling_settings"]

logger = logging.getLogger(__name__)


def shard(items: Sequence, rank: int, world_size: int) -> List:
    """The share of global rank ``rank``: every ``world_size``-th item from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return list(items[rank::world_size])


def labelling_settings(defaults: InferenceSettings, settings: Dict) -> InferenceSettings:
    """The model's settings with the run's ``box_threshold``, ``nms`` (IoU, 0 = off) and
    ``max_per_image``."""
    return defaults.replace(
        box_threshold=settings["box_threshold"],
        max_detections=settings["max_per_image"],
        nms_threshold=settings["nms"],
    )


def label_batch(predictor, batch: List[Dict], settings: Dict) -> List[Dict]:
    """
    Labels one loader batch.

    Args:
        predictor: a ``GroundingDINOPredictor``.
        batch: the loader's dicts (``image`` or ``error``).
        settings: ``classes``, ``box_threshold``, ``nms`` (IoU, 0 = off), ``max_per_image``.

    Returns:
        one part-file record per image of the batch, in order. An image the model refuses
        (``ValueError``, e.g. smaller than the backbone's stride) gets an error record; the
        rest of its batch is labelled one by one.
    """
    classes = settings["classes"]
    inference = labelling_settings(predictor.settings, settings)

    def _predict(images: List) -> List:
        return predictor.predict_batch(images, [classes] * len(images), settings=inference)

    good = [item for item in batch if "image" in item]
    try:
        outputs = _predict([item["image"] for item in good]) if good else []
    except ValueError:
        outputs = []
        for item in good:
            try:
                outputs.extend(_predict([item["image"]]))
            except ValueError as error:
                item["error"] = f"{item['path']}: {error}"
                outputs.append(None)
    results = iter(outputs)
    records = []
    for item in batch:
        output = next(results) if "image" in item else None
        if "error" in item:
            records.append(error_record(item["file_name"], item["path"], item["error"]))
            continue
        height, width = item["image"].shape[:2]
        records.append(label_record(item["file_name"], width, height, output))
    return records


def label_worker(settings: Dict, todo: Sequence[Tuple[str, str]]) -> None:
    """
    One labelling process: its shard of ``todo`` (``(path, file_name)`` pairs) -> its part
    file (``settings["parts_dir"]``).
    """
    torch.set_grad_enabled(False)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    items = shard(todo, rank, world_size)
    config = load_config(settings["config_file"], settings["opts"], settings["weights"])
    predictor = GroundingDINOPredictor.from_model_config(
        config, device=settings["device"], dtype=settings["dtype"]
    )
    loader = build_image_loader(
        items, batch_size=settings["batch_size"], num_workers=settings["decode_workers"]
    )
    with PartWriter(settings["parts_dir"], rank) as writer:
        for batch in loader:
            try:
                records = label_batch(predictor, batch, settings)
            except Exception as error:
                names = ", ".join(item["path"] for item in batch)
                raise RuntimeError(f"labelling [{names}] failed: {error}") from error
            writer.append(records)
