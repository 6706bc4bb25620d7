"""
Fine-tuning without forgetting, the training side (docs/training.md, "Keep what the model
knew"): retention sets evaluated beside the target (``metrics.json``, the log), frozen
parameters that do not move, replayed base data at the share asked for, each prompted with its
own class names. One ``train_net.py`` run from the command line covers the switches as a user
sets them; the sampler's shares and the mapper are checked in-process.
"""

import json
import os

import numpy as np
import pytest
import torch
from test_own_data import FAST, WAY1_CONFIG, dataset_overrides, run_train_net, write_dataset

from grounding_dino.convert.checkpoint import load_checkpoint_file
from grounding_dino.data.mapper import GroundingDatasetMapper
from grounding_dino.data.samplers import kind_repeat_factors, kind_shares
from grounding_dino.engine.recipes import freeze_parameters

# The README's user config: way 1's config, plus base datasets (other class names on the same
# images) registered for retention and replay.
RECIPE_CONFIG = WAY1_CONFIG + """
import os
from grounding_dino.data.datasets import register_coco_format

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
register_coco_format("base_train", f"{_DATA}/train.json", f"{_DATA}/images", ["star", "moon"])
register_coco_format("base_test", f"{_DATA}/test.json", f"{_DATA}/images", ["star", "moon"])
"""


def metrics_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_retention_freeze_and_replay_from_the_command_line(tmp_path, tiny_model):
    data = write_dataset(str(tmp_path / "data"), num_train=4, num_test=2)
    (tmp_path / "config.py").write_text(RECIPE_CONFIG)
    init = str(tmp_path / "init.pth")
    torch.save({"model": tiny_model.state_dict()}, init)
    out = str(tmp_path / "out")
    rc, log = run_train_net(
        "--config-file",
        str(tmp_path / "config.py"),
        *dataset_overrides(data),
        f"train.output_dir={out}",
        *FAST,
        f"train.init_checkpoint={init}",
        "dataloader.retention=[base_test]",
        "train.freeze=[backbone.*,enhancer.layers.*.fusion.*]",
        "dataloader.train.dataset.replay=[base_train]",
        "dataloader.train.sampler.shares.replay=0.5",
    )
    assert rc == 0, log[-4000:]
    # Retention: evaluated after the target, its own AP table, under its own keys.
    assert "Evaluating the retention set base_test (dataloader.retention)" in log
    evaluation = [line for line in metrics_lines(out) if "bbox/AP50" in line]
    assert len(evaluation) == 1
    for key in ("bbox/AP", "bbox/AP50", "retention/base_test/bbox/AP50"):
        assert isinstance(evaluation[0][key], float), key
    tables = log.split("Per-category bbox AP:")
    assert "star" in tables[-1] and "moon" in tables[-1]  # the retention set's own names
    assert "cls 3" in tables[-2] or "cls_3" in tables[-2]
    assert os.path.isfile(f"{out}/inference/retention_base_test/coco_instances_results.json")
    # Replay at the share asked for (4 target and 4 replayed records: factor 1 each).
    assert "Replaying 4 records of base_train" in log
    assert "detection 50.0%, replay 50.0% of the training samples" in log
    # Frozen: the backbone and the fusion layers are the initial weights, the rest moved.
    assert "train.freeze 'backbone.*': froze" in log
    final = load_checkpoint_file(f"{out}/model_final.pth")["model"]
    start = tiny_model.state_dict()
    for key, value in final.items():
        same = torch.equal(value, start[key])
        if key.startswith("backbone.") or ".fusion." in key:
            assert same, key
    moved = [
        k for k, v in final.items() if k.startswith("decoder.") and not torch.equal(v, start[k])
    ]
    assert moved


def test_freeze_patterns_count_and_name_errors(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone."))
    assert freeze_parameters(model, ["backbone.*"]) == backbone
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone"))
    with pytest.raises(ValueError, match=r"'fusion\.\*' matches no parameter name"):
        freeze_parameters(model, ["fusion.*"])


def _records(kinds):
    records = []
    for i, kind in enumerate(kinds):
        record = {"image_id": i, "annotations": []}
        if kind in ("grounding", "rec"):
            record["caption"] = "a cat"
        if kind == "rec":
            record["task"] = "rec"
        if kind == "replay":
            record["replay"] = "base_train"
        records.append(record)
    return records


def test_replay_share_is_exact_whatever_the_record_counts():
    # 90 target detection records, 10 grounding, 400 replayed: the replay share is what is
    # asked, the others keep their ratio (detection twice as often per record).
    records = _records(["detection"] * 90 + ["grounding"] * 10 + ["replay"] * 400)
    shares = kind_shares(records, {"detection": 2.0}, {"replay": 0.25})
    assert shares["replay"] == pytest.approx(0.25, abs=1e-6)
    assert shares["detection"] == pytest.approx(0.75 * 180 / 190, abs=1e-6)
    assert shares["grounding"] == pytest.approx(0.75 * 10 / 190, abs=1e-6)
    factors = kind_repeat_factors(records, {}, {"replay": 0.25})
    assert factors[-1].item() == pytest.approx(0.25 / 0.75 * 100 / 400)
    # What RepeatFactorTrainingSampler draws over many epochs matches the shares.
    from grounding_dino.data.samplers import build_kind_sampler

    sampler = build_kind_sampler(records, {"detection": 2.0}, seed=0, shares={"replay": 0.25})
    drawn = [i for _, i in zip(range(40000), iter(sampler))]
    replayed = np.mean([records[i].get("replay") is not None for i in drawn])
    assert replayed == pytest.approx(0.25, abs=0.02)
    # A share for a group without records is said, not an error; bad shares are errors.
    assert kind_shares(_records(["detection"] * 3), {}, {"replay": 0.25}) == {"detection": 1.0}
    with pytest.raises(ValueError, match="must sum to 1"):
        kind_shares(_records(["replay"] * 3), {}, {"replay": 0.5})
    with pytest.raises(ValueError, match=r"shares\['replay'\] must be in \(0, 1\)"):
        kind_shares(records, {}, {"replay": 1.5})
    with pytest.raises(ValueError, match="Unknown record kinds"):
        kind_shares(records, {}, {"base": 0.5})


def test_a_replayed_record_is_prompted_with_its_own_classes(tmp_path, minilm_dir):
    import cv2

    image = np.full((64, 64, 3), 200, np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image)
    mapper = GroundingDatasetMapper(
        True,
        augmentations=[],
        tokenizer=minilm_dir,
        drop_warning_period=1000,
        thing_classes=["pothole", "road crack"],
    )
    box = {"bbox": [4, 4, 20, 20], "bbox_mode": 0, "category_id": 1}
    record = {"file_name": path, "height": 64, "width": 64, "image_id": 1, "annotations": [box]}
    assert "road crack" in mapper(record)["caption"]
    replayed = dict(record, replay="base_train", thing_classes=("red star", "blue moon"))
    mapped = mapper(replayed)
    assert "blue moon" in mapped["caption"] and "pothole" not in mapped["caption"]
    spans = mapped["tokens_positive"][0]  # one span per word of the phrase
    assert " ".join(mapped["caption"][b:e] for b, e in spans) == "blue moon"
