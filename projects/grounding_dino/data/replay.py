"""
Replay of base data while fine-tuning: the records of datasets the model already knew, drawn
beside the new ones so that it keeps what it learned there.

:func:`get_dataset_dicts_with_replay` is detectron2's ``get_detection_dataset_dicts`` with
``replay``: the records of those datasets follow the target's, each tagged ``"replay"`` (its
dataset's name) and, for detection records, ``"thing_classes"`` (its dataset's category
names): the mapper then prompts a replayed image with its own dataset's names and negatives,
never with the target's (a target image may hold unannotated base objects, and a base image
unannotated target ones). :func:`~grounding_dino.data.samplers.build_kind_sampler` draws the
"replay" group at the share its ``shares`` give. In a config::

    dataloader.train.dataset = L(get_dataset_dicts_with_replay)(
        names="my_dataset_train", replay=["shapes_train"]
    )
    dataloader.train.sampler = L(build_kind_sampler)(
        dataset_dicts="${..dataset}", shares={"replay": 0.25}
    )
"""

import logging
from typing import Dict, List, Sequence, Union

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

from .datasets import get_thing_classes
from .mapper import record_kind

__all__ = ["get_dataset_dicts_with_replay"]

logger = logging.getLogger(__name__)


def get_dataset_dicts_with_replay(
    names: Union[str, Sequence[str]], replay: Sequence[str] = (), **kwargs
) -> List[Dict]:
    """
    Args:
        names: the target datasets (``get_detection_dataset_dicts``' ``names``).
        replay: registered datasets to replay (e.g. the base model's training sets); empty:
            the target records alone.
        kwargs: ``get_detection_dataset_dicts`` arguments (filter_empty,
            check_consistency...), applied to the target and the replay datasets alike.

    Returns:
        the target records, then the replay records (shallow copies, tagged).
    """
    records = list(get_detection_dataset_dicts(names, **kwargs))
    target_names = [names] if isinstance(names, str) else list(names)
    for name in replay:
        if name in target_names:
            raise ValueError(f"Dataset {name!r} is both a target and a replay dataset")
        loaded = get_detection_dataset_dicts(name, **kwargs)
        classes = None
        if any(record_kind(r) == "detection" for r in loaded):
            classes = tuple(get_thing_classes(name))
        for record in loaded:
            record = dict(record, replay=name)
            if classes is not None and record_kind(record) == "detection":
                record["thing_classes"] = classes
            records.append(record)
        evaluator = MetadataCatalog.get(name).get("evaluator_type", "?")
        logger.info(f"Replaying {len(loaded)} records of {name} ({evaluator}) beside {names}")
    return records
