"""
Training samplers that mix record kinds (detection, grounding, REC) at chosen rates.

:func:`build_kind_sampler` gives detectron2's :class:`RepeatFactorTrainingSampler` a repeat
factor per record from its group (:func:`record_group`): its kind
(:func:`~grounding_dino.data.mapper.record_kind`), or "replay" for a record replayed from base
data (:mod:`~grounding_dino.data.replay`). With ``repeat_factors={"detection": 2.0}``, every
detection record is seen twice per epoch on average and the other kinds once; with
``shares={"replay": 0.25}``, a quarter of the samples are replayed records, whatever the
number of records on each side. In a config::

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
    "RECORD_GROUPS",
    "record_group",
    "kind_repeat_factors",
    "kind_shares",
    "describe_shares",
    "build_kind_sampler",
]

logger = logging.getLogger(__name__)

RECORD_KINDS = ("detection", "grounding", "rec")
# The sampler's groups: the kinds, and the records replayed from base data (any kind).
RECORD_GROUPS = RECORD_KINDS + ("replay",)


def record_group(record: Mapping) -> str:
    """ "replay" for a record tagged by :mod:`~grounding_dino.data.replay`, else its kind."""
    return "replay" if record.get("replay") else record_kind(record)


def _check_factors(values: Mapping[str, float], what: str) -> Dict[str, float]:
    unknown = sorted(set(values) - set(RECORD_GROUPS))
    if unknown:
        raise ValueError(
            f"Unknown record kinds {unknown} in {what}; expected some of {RECORD_GROUPS}"
        )
    return {kind: float(value) for kind, value in values.items()}


def kind_repeat_factors(
    dataset_dicts: Sequence[Mapping],
    repeat_factors: Mapping[str, float],
    shares: Optional[Mapping[str, float]] = None,
) -> torch.Tensor:
    """
    Args:
        dataset_dicts: the training records (detectron2 dataset dicts).
        repeat_factors: {group: factor > 0} for groups of :data:`RECORD_GROUPS`; groups not
            named get 1.
        shares: {group: expected fraction of the samples, in (0, 1)}: the factors of these
            groups are scaled to give exactly that share; the other groups fill the rest in
            proportion to their records times their repeat factors. A group without records
            is skipped (logged).

    Returns:
        [len(dataset_dicts)] float32 repeat factors, for :class:`RepeatFactorTrainingSampler`.
    """
    factors = _check_factors(repeat_factors, "repeat_factors")
    for kind, factor in factors.items():
        if not factor > 0:
            raise ValueError(f"repeat_factors['{kind}'] must be > 0, got {factor}")
    groups = [record_group(record) for record in dataset_dicts]
    weights = {g: factors.get(g, 1.0) for g in set(groups)}
    wanted = _check_factors(shares or {}, "shares")
    for group, share in sorted(wanted.items()):
        if not 0.0 < share < 1.0:
            raise ValueError(f"shares['{group}'] must be in (0, 1), got {share}")
        if group not in weights:
            logger.info(f"shares['{group}']={share}: no {group} records, nothing to draw")
    wanted = {g: s for g, s in wanted.items() if g in weights}
    if wanted:
        counts = collections.Counter(groups)
        rest = {g: counts[g] * weights[g] for g in weights if g not in wanted}
        left = 1.0 - sum(wanted.values())
        if not rest and abs(left) > 1e-6 or rest and left <= 0:
            raise ValueError(
                f"shares {wanted} must sum to 1 when they name every group present "
                f"({sorted(weights)}), and to less than 1 otherwise"
            )
        # Mass of the other groups is sum(rest); a named group g must get
        # wanted[g] / left * sum(rest) in all: its factor is that over its record count.
        unit = sum(rest.values()) / left if rest else 1.0
        for group, share in wanted.items():
            weights[group] = share * unit / counts[group]
    return torch.tensor([weights[g] for g in groups], dtype=torch.float32)


def kind_shares(
    dataset_dicts: Sequence[Mapping],
    repeat_factors: Mapping[str, float],
    shares: Optional[Mapping[str, float]] = None,
) -> Dict[str, float]:
    """{group: expected fraction of the training samples} under ``repeat_factors`` and
    ``shares`` (:func:`kind_repeat_factors`)."""
    factors = kind_repeat_factors(dataset_dicts, repeat_factors, shares)
    totals: Dict[str, float] = collections.defaultdict(float)
    for record, factor in zip(dataset_dicts, factors.tolist()):
        kind = record_group(record)
        totals[kind] += factor
    total = sum(totals.values())
    return {kind: value / total for kind, value in sorted(totals.items())}


def describe_shares(shares: Mapping[str, float]) -> str:
    """ "detection 50.0%, rec 50.0%" for :func:`kind_shares`' result."""
    return ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in shares.items())


def build_kind_sampler(
    dataset_dicts: Sequence[Mapping],
    repeat_factors: Optional[Mapping[str, float]] = None,
    seed: Optional[int] = None,
    shares: Optional[Mapping[str, float]] = None,
) -> RepeatFactorTrainingSampler:
    """
    A :class:`RepeatFactorTrainingSampler` over ``dataset_dicts`` with the repeat factors of
    :func:`kind_repeat_factors`. Logs the share of each kind among the sampled records.

    Args:
        dataset_dicts: the training records, in the order of the training dataset (the same
            list that ``dataloader.train.dataset`` builds).
        repeat_factors: {group: factor}; see :func:`kind_repeat_factors`.
        shares: {group: share of the samples}; see :func:`kind_repeat_factors`.
        seed: the sampler's seed; None draws one shared by all processes.
    """
    if len(dataset_dicts) == 0:
        raise ValueError("build_kind_sampler got an empty dataset")
    repeat_factors = dict(repeat_factors or {})
    factors = kind_repeat_factors(dataset_dicts, repeat_factors, shares)
    asked = f"repeat factors {repeat_factors}" + (f", shares {dict(shares)}" if shares else "")
    logger.info(
        f"Sampling record kinds with {asked}: "
        f"{describe_shares(kind_shares(dataset_dicts, repeat_factors, shares))} of the "
        "training samples"
    )
    return RepeatFactorTrainingSampler(factors, shuffle=True, seed=seed)
