"""
Sharding and the labelling worker.

``label_worker`` runs in every process started by :func:`grounding_dino.engine.launch`
(detectron2's ``launch`` on GPUs, gloo processes on the CPU). The images still to do are
dealt round-robin over the global ranks (``todo[rank::world_size]``); each process reads its
share through the image DataLoader, runs the model on batches and appends every finished image
to its own part file. The processes never wait for each other. With a segmenter (``--sam``)
each process also loads the mask stage, and every box of an image gets its mask (an RLE in the
image's record).

Every failure of one image (any ``Exception``: an unreadable file, a decompression bomb, a
``RuntimeError`` or out-of-memory error of the model) becomes an error line of the part file and
the worker goes on. Before each batch the worker writes an attempt line, so that a rerun knows
which images were in the batch of a worker that died (see :mod:`grounding_dino.io.parts`).
The worker dies with the process that started it, and its decoding processes with it, so a
``kill -9`` of the command leaves no process holding a part file's lock.
"""

import logging
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.utils import comm

from ..io.coco_files import error_record, label_record
from ..io.images import build_image_loader
from ..io.parts import PartWriter
from ..io.processes import die_with_parent
from ..model_zoo import load_config
from ..modeling.settings import InferenceSettings
from ..predictor import GroundingDINOPredictor
from ..segment import MaskStage

__all__ = ["shard", "label_worker", "label_batch", "labelling_settings"]

logger = logging.getLogger(__name__)

# A decoding process that died (kill -9, the OOM killer) makes the DataLoader raise a
# RuntimeError with this text, from ``next()`` or from its SIGCHLD handler at any point of the
# worker's main thread; it is the loader's failure, not the image's. At most this many
# restarts of the loader per worker and run.
_DECODER_DIED = "DataLoader worker"
MAX_LOADER_RESTARTS = 2


def _decoder_died(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and _DECODER_DIED in str(error)


def _reason(error: Exception) -> str:
    """The error-line reason of an exception (ValueErrors are the library's own messages)."""
    if isinstance(error, ValueError):
        return str(error)
    return f"{type(error).__name__}: {error}"


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
        predictor: a ``GroundingDINOPredictor`` (with a mask stage, the records get
            ``"segmentations"``).
        batch: the loader's dicts (``image`` or ``error``).
        settings: ``classes``, ``box_threshold``, ``nms`` (IoU, 0 = off), ``max_per_image``.

    Returns:
        one part-file record per image of the batch, in order. An image whose labelling
        raises any ``Exception`` (the model refuses it, runs out of memory on it...) gets an
        error record; when a batch fails, its images are labelled one by one.

    Raises:
        RuntimeError: only when a decoding process of the loader died (not an image's fault).
    """
    classes = settings["classes"]
    inference = labelling_settings(predictor.settings, settings)

    def _predict(images: List) -> List:
        return predictor.predict_batch(images, [classes] * len(images), settings=inference)

    def _record(item: Dict, output) -> Dict:
        height, width = item["image"].shape[:2]
        return label_record(item["file_name"], width, height, output)

    good = [item for item in batch if "image" in item]
    records = {}
    try:
        outputs = _predict([item["image"] for item in good]) if good else []
        for item, output in zip(good, outputs):
            records[id(item)] = _record(item, output)
    except Exception as error:
        if _decoder_died(error):
            raise
        if len(good) == 1:
            good[0]["error"] = f"{good[0]['path']}: {_reason(error)}"
        else:
            for item in good:
                try:
                    records[id(item)] = _record(item, _predict([item["image"]])[0])
                except Exception as error:
                    if _decoder_died(error):
                        raise
                    item["error"] = f"{item['path']}: {_reason(error)}"
    return [
        (
            error_record(item["file_name"], item["path"], item["error"])
            if "error" in item
            else records[id(item)]
        )
        for item in batch
    ]


@torch.no_grad()  # not set_grad_enabled: with one worker this runs in the caller's process
def label_worker(settings: Dict, todo: Sequence[Tuple[str, str]]) -> None:
    """
    One labelling process: its shard of ``todo`` (``(path, file_name)`` pairs) -> its part
    file (``settings["parts_dir"]``).
    """
    if os.getpid() != settings["main_pid"]:
        die_with_parent(settings["main_pid"])  # a kill -9 of the command ends its workers
    rank, world_size = comm.get_rank(), comm.get_world_size()
    items = shard(todo, rank, world_size)
    device = settings["device"]
    if torch.device(device).type == "cuda" and world_size > 1:
        torch.cuda.set_device(comm.get_local_rank())  # one GPU per worker of this machine
    config = load_config(settings["config_file"], settings["opts"], settings["weights"])
    mask_stage = None
    if settings["sam"]:
        mask_stage = MaskStage.from_pretrained(
            settings["sam"],
            device=device,
            dtype=settings["dtype"],
            box_batch_size=settings["sam_batch_size"],
        )
    predictor = GroundingDINOPredictor.from_model_config(
        config, device=device, dtype=settings["dtype"], mask_stage=mask_stage
    )
    batch_size = settings["batch_size"]
    with PartWriter(settings["parts_dir"], rank) as writer:
        position, restarts = 0, 0
        while position < len(items):
            loader = build_image_loader(
                items[position:],
                batch_size=batch_size,
                num_workers=settings["decode_workers"],
                max_pixels=settings["max_pixels"],
                min_size=predictor.model.backbone.size_divisibility,
                private_fds=[writer.fileno()],
            )
            batches = iter(loader)
            try:
                while position < len(items):
                    writer.mark_attempt(items[position : position + batch_size])
                    batch = next(batches)
                    writer.append(label_batch(predictor, batch, settings))
                    position += len(batch)
            except RuntimeError as error:
                if not _decoder_died(error) or restarts >= MAX_LOADER_RESTARTS:
                    raise
                restarts += 1
                print(
                    f"WARNING {error}; decoding again from image {position} of {len(items)} "
                    f"of worker {rank}",
                    file=sys.stderr,
                )
            finally:
                del batches  # shuts the decoding processes down
