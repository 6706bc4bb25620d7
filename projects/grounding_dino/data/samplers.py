"""
Training samplers that mix record kinds (detection, grounding, REC) at chosen rates.

:func:`build_kind_sampler` gives detectron2's :class:`RepeatFactorTrainingSampler` a repeat
factor per record from its kind (:func:`~grounding_dino.data.mapper.record_kind`): with
``{"detection": 2.0}``, every detection record is seen twice per epoch on average and the
other kinds once. In a config::

    dataloader.train.sampler = L(build_kind_sampler)(
        dataset_dicts="${..dataset}", repeat_factors={"detection": 2.0}
    )
"""

import collections
import logging
from typing import Dict, Mapping, Optional, Sequence

import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .mapper import record_kind

__all__ = [
    "RECORD_KINDS",
    "kind_repeat_factors",
    "kind_shares",
    "describe_shares",
    "build_kind_sampler",
]

logger = logging.getLogger(__name__)

RECORD_KINDS = ("detection", "grounding", "rec")


def kind_repeat_factors(
    dataset_dicts: Sequence[Mapping], repeat_factors: Mapping[str, float]
) -> torch.Tensor:
    """
    Args:
        dataset_dicts: the training records (detectron2 dataset dicts).
        repeat_factors: {kind: factor > 0} for kinds of :data:`RECORD_KINDS`; kinds not named
            get 1.

    Returns:
        [len(dataset_dicts)] float32 repeat factors, for :class:`RepeatFactorTrainingSampler`.
    """
    factors = dict(repeat_factors)
    unknown = sorted(set(factors) - set(RECORD_KINDS))
    if unknown:
        raise ValueError(
            f"Unknown record kinds {unknown} in repeat_factors; expected some of {RECORD_KINDS}"
        )
    for kind, factor in factors.items():
        if not float(factor) > 0:
            raise ValueError(f"repeat_factors['{kind}'] must be > 0, got {factor}")
    kinds = [record_kind(record) for record in dataset_dicts]
    return torch.tensor([float(factors.get(kind, 1.0)) for kind in kinds], dtype=torch.float32)


def kind_shares(
    dataset_dicts: Sequence[Mapping], repeat_factors: Mapping[str, float]
) -> Dict[str, float]:
    """{kind: expected fraction of the training samples} under ``repeat_factors``."""
    factors = kind_repeat_factors(dataset_dicts, repeat_factors)
    totals: Dict[str, float] = collections.defaultdict(float)
    for record, factor in zip(dataset_dicts, factors.tolist()):
        kind = record_kind(record)
        totals[kind] += factor
    total = sum(totals.values())
    return {kind: value / total for kind, value in sorted(totals.items())}


def describe_shares(shares: Mapping[str, float]) -> str:
    """ "detection 50.0%, rec 50.0%" for :func:`kind_shares`' result."""
    return ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in shares.items())


def build_kind_sampler(
    dataset_dicts: Sequence[Mapping],
    repeat_factors: Mapping[str, float],
    seed: Optional[int] = None,
) -> RepeatFactorTrainingSampler:
    """
    A :class:`RepeatFactorTrainingSampler` over ``dataset_dicts`` with the repeat factors of
    :func:`kind_repeat_factors`. Logs the share of each kind among the sampled records.

    Args:
        dataset_dicts: the training records, in the order of the training dataset (the same
            list that ``dataloader.train.dataset`` builds).
        repeat_factors: {kind: factor}; see :func:`kind_repeat_factors`.
        seed: the sampler's seed; None draws one shared by all processes.
    """
    if len(dataset_dicts) == 0:
        raise ValueError("build_kind_sampler got an empty dataset")
    factors = kind_repeat_factors(dataset_dicts, repeat_factors)
    logger.info(
        f"Sampling record kinds with repeat factors {dict(repeat_factors)}: "
        f"{describe_shares(kind_shares(dataset_dicts, repeat_factors))} of the training samples"
    )
    return RepeatFactorTrainingSampler(factors, shuffle=True, seed=seed)
