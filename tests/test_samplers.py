"""Mixing record kinds at chosen rates (``grounding_dino.data.samplers``)."""

import collections
import itertools
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data.samplers import RepeatFactorTrainingSampler

from grounding_dino.data import record_kind
from grounding_dino.data.samplers import build_kind_sampler, kind_repeat_factors, kind_shares

REPO = Path(__file__).resolve().parents[1]


def _records(detection: int, rec: int, grounding: int = 0):
    records = [{"file_name": f"d{i}.png", "annotations": []} for i in range(detection)]
    records += [
        {"file_name": f"r{i}.png", "caption": "the red dot", "task": "rec"} for i in range(rec)
    ]
    records += [{"file_name": f"g{i}.png", "caption": "a red dot"} for i in range(grounding)]
    return records


def test_repeat_factors_follow_the_record_kind():
    records = _records(detection=2, rec=3, grounding=1)
    factors = kind_repeat_factors(records, {"detection": 2.0, "grounding": 0.5})
    expected = [2.0, 2.0, 1.0, 1.0, 1.0, 0.5]  # rec is not named: 1
    assert factors.dtype == torch.float32
    assert factors.tolist() == expected
    # 2 * 2 detection, 3 rec, 0.5 grounding samples per epoch on average.
    shares = kind_shares(records, {"detection": 2.0, "grounding": 0.5})
    assert shares == pytest.approx({"detection": 4 / 7.5, "grounding": 0.5 / 7.5, "rec": 3 / 7.5})


def test_bad_repeat_factors_are_refused_with_the_kind_named():
    records = _records(detection=1, rec=1)
    with pytest.raises(ValueError, match=r"'detections'.*expected some of"):
        kind_repeat_factors(records, {"detections": 2.0})
    with pytest.raises(ValueError, match=r"repeat_factors\['rec'\] must be > 0, got 0"):
        kind_repeat_factors(records, {"rec": 0})
    with pytest.raises(ValueError, match="empty dataset"):
        build_kind_sampler([], {"detection": 2.0})


def test_sampler_draws_the_kinds_at_the_chosen_rates():
    # 10 detection and 20 REC records: uniform sampling gives a third detection; a detection
    # repeat factor of 2 gives half.
    records = _records(detection=10, rec=20)
    for factors, expected in (({}, 1 / 3), ({"detection": 2.0}, 1 / 2)):
        sampler = build_kind_sampler(records, factors, seed=0)
        assert isinstance(sampler, RepeatFactorTrainingSampler)
        drawn = list(itertools.islice(iter(sampler), 6000))
        kinds = collections.Counter(record_kind(records[i]) for i in drawn)
        assert kinds["detection"] / len(drawn) == pytest.approx(expected, abs=0.02)
        # Every record is drawn, none is starved.
        assert set(drawn) == set(range(len(records)))


def _detection_share(cfg, draws=4000):
    sampler = instantiate(cfg.dataloader.train.sampler)
    records = instantiate(cfg.dataloader.train.dataset)
    drawn = list(itertools.islice(iter(sampler), draws))
    kinds = collections.Counter(record_kind(records[i]) for i in drawn)
    return kinds["detection"] / len(drawn), records


def test_shapes_config_samples_detection_more_often(tmp_path):
    """
    Proves that the packaged demo config's sampler, built from its own dataset node, draws
    detection records at the rate its repeat factor sets (twice each, about half of the
    samples as the config says), and that overriding the factor changes the draws: with
    ``repeat_factors.detection=1`` the share falls to detection's share of the records.
    """
    from grounding_dino.data.synthetic import register_shapes_datasets

    cfg = LazyConfig.load(str(REPO / "configs" / "shapes_tiny.py"))
    shapes = {**cfg.shapes, "num_train": 4, "num_val": 2}
    register_shapes_datasets(root=str(tmp_path), **shapes)
    share, records = _detection_share(cfg)
    kinds = collections.Counter(record_kind(r) for r in records)
    assert set(kinds) == {"detection", "grounding"}
    detection, grounding = kinds["detection"], kinds["grounding"]
    assert share == pytest.approx(2 * detection / (2 * detection + grounding), abs=0.02)
    assert share == pytest.approx(0.5, abs=0.1)
    cfg = LazyConfig.apply_overrides(cfg, ["dataloader.train.sampler.repeat_factors.detection=1"])
    uniform, _ = _detection_share(cfg)
    assert uniform == pytest.approx(detection / (detection + grounding), abs=0.02)
    assert share - uniform > 0.1
