"""
Checkpoints must match the model. Every inference entry point (``GroundingDINOPredictor``, the
yacs bridge's ``DefaultPredictor``, ``train_net.py --eval-only``) and the training
initialisation refuse a checkpoint with a missing key, an unexpected key or a weight of the
wrong shape, with an error naming the key; a matching checkpoint loads; a partial training
initialisation loads only when ``train.init_partial`` allows it, and is reported.
"""

import logging

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, get_cfg
from detectron2.engine import DefaultPredictor
from test_eval_threshold import build_and_save, run_main, write_tiny_setup
from torch import nn

from grounding_dino.checkpoint import (
    CheckpointMismatchError,
    GroundingDINOCheckpointer,
    compare_state_dict,
)
from grounding_dino.config import add_grounding_dino_config
from grounding_dino.predictor import GroundingDINOPredictor

MISSING = "decoder.layers.0.linear1.weight"
UNEXPECTED = "decoder.layers.0.extra.weight"
WRONG_SHAPE = "query_selector.tgt_embed.weight"
# (case, the key the error must name, what it must say about it)
BAD = [
    ("missing", MISSING, "1 missing key"),
    ("unexpected", UNEXPECTED, "1 unexpected key"),
    ("wrong_shape", WRONG_SHAPE, r"1 weight\(s\) of the wrong shape"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny config, and checkpoints: "good" (the model's own) and one per bad case."""
    root = tmp_path_factory.mktemp("strict_loading")
    config = write_tiny_setup(str(root))
    paths = {"good": str(root / "good.pth")}
    model = build_and_save(config, paths["good"])
    state = model.state_dict()
    assert MISSING in state and UNEXPECTED not in state and WRONG_SHAPE in state
    for case, change in (
        ("missing", lambda s: s.pop(MISSING)),
        ("unexpected", lambda s: s.__setitem__(UNEXPECTED, torch.zeros(3))),
        ("wrong_shape", lambda s: s.__setitem__(WRONG_SHAPE, s[WRONG_SHAPE][:-1].clone())),
    ):
        bad = dict(state)
        change(bad)
        paths[case] = str(root / f"{case}.pth")
        torch.save({"model": bad}, paths[case])
    return config, paths


def _image():
    image = np.full((96, 128, 3), 200, np.uint8)
    image[20:50, 20:50] = (0, 0, 220)
    return image


# ---------------------------------------------------------------- the check itself
def test_non_persistent_buffers_are_neither_missing_nor_unexpected(setup):
    config, paths = setup
    model = build_and_save(config, paths["good"] + ".unused")
    state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()} - set(state)
    assert "pixel_mean" in buffers  # computed from the config, not saved
    assert not compare_state_dict(model, state)
    # Old checkpoints may hold them (e.g. BERT's position_ids): ignored, not unexpected.
    with_buffers = {**state, **{name: torch.zeros(1) for name in buffers}}
    mismatch = compare_state_dict(model, with_buffers)
    assert not mismatch and sorted(mismatch.computed) == sorted(buffers)
    path = paths["good"] + ".with_buffers"
    torch.save({"model": with_buffers}, path)
    pixel_mean = model.pixel_mean.clone()
    GroundingDINOCheckpointer(model).load(path)
    assert torch.equal(model.pixel_mean, pixel_mean)  # the model's own value, not the file's


def test_checkpointer_names_the_first_keys_and_the_count():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    mismatch = compare_state_dict(model, {"0.weight": torch.zeros(2, 2)})
    message = mismatch.describe()
    assert message.startswith("15 missing key(s)")
    assert "0.bias, 1.weight, 1.bias, 2.weight, 2.bias, ... (10 more)" in message
    # A checkpoint saved from a DistributedDataParallel model ("module." prefix) matches.
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    assert not compare_state_dict(model, wrapped)


# ---------------------------------------------------------------- the entry points
@pytest.mark.parametrize("case,key,what", BAD)
def test_predictor_refuses_a_mismatched_checkpoint(setup, case, key, what):
    config, paths = setup
    cfg = LazyConfig.load(config)
    with pytest.raises(CheckpointMismatchError, match=what) as error:
        GroundingDINOPredictor(cfg, weights=paths[case])
    assert key in str(error.value) and paths[case] in str(error.value)


def test_predictor_loads_a_matching_checkpoint_and_refuses_none(setup):
    config, paths = setup
    cfg = LazyConfig.load(config)
    predictor = GroundingDINOPredictor(cfg, weights=paths["good"])
    reference = torch.load(paths["good"], weights_only=True)["model"]
    for name, value in predictor.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert len(predictor(_image(), "red square")["instances"]) > 0
    with pytest.raises(ValueError, match="no weights"):
        GroundingDINOPredictor(cfg)  # train.init_checkpoint is "": no random model


def _yacs(config, weights):
    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = config
    cfg.MODEL.GROUNDING_DINO.PROMPT = "red square"
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("case,key,what", BAD)
def test_default_predictor_refuses_a_mismatched_checkpoint(setup, case, key, what):
    config, paths = setup
    with pytest.raises(CheckpointMismatchError, match=what) as error:
        DefaultPredictor(_yacs(config, paths[case]))
    assert key in str(error.value)


def test_default_predictor_loads_a_matching_checkpoint(setup):
    config, paths = setup
    predictor = DefaultPredictor(_yacs(config, paths["good"]))
    assert len(predictor(_image())["instances"]) > 0


def test_eval_only_refuses_a_mismatched_checkpoint(setup, tmp_path):
    config, paths = setup
    for case, key, what in BAD:
        with pytest.raises(CheckpointMismatchError, match=what) as error:
            run_main(
                config,
                "--eval-only",
                f"train.init_checkpoint={paths[case]}",
                f"train.output_dir={tmp_path / case}",
            )
        assert key in str(error.value), case
    with pytest.raises(ValueError, match="random"):  # nothing to evaluate
        run_main(config, "--eval-only", f"train.output_dir={tmp_path / 'none'}")


def test_training_init_is_strict_unless_the_config_allows_a_partial_one(setup, tmp_path, caplog):
    config, paths = setup
    common = ["train.eval_period=-1", "train.max_iter=1"]
    for case, key, what in BAD:
        with pytest.raises(CheckpointMismatchError, match=what) as error:
            run_main(
                config,
                f"train.init_checkpoint={paths[case]}",
                f"train.output_dir={tmp_path / case}",
            )
        assert key in str(error.value) and "train.init_partial" in str(error.value)

    # Prefixes that do not cover the missing key: still an error.
    with pytest.raises(CheckpointMismatchError, match="Not covered by train.init_partial"):
        run_main(
            config,
            f"train.init_checkpoint={paths['missing']}",
            f"train.output_dir={tmp_path / 'neck'}",
            "train.init_partial=['neck.']",
            *common,
        )

    # Allowed: by prefix, or all of it; the load reports what it skipped.
    for index, partial in enumerate(("['decoder.layers.0.']", "True")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="grounding_dino.checkpoint"):
            run_main(
                config,
                f"train.init_checkpoint={paths['missing']}",
                f"train.output_dir={tmp_path / f'partial{index}'}",
                f"train.init_partial={partial}",
                *common,
            )
        (report,) = [r.getMessage() for r in caplog.records if "Partial load" in r.getMessage()]
        assert MISSING in report and "1 missing key" in report
        total = len(torch.load(paths["good"], weights_only=True)["model"])
        assert f"loaded {total - 1} of {total} model tensors" in report
        assert "decoder " in report and "backbone " in report  # per-module counts

    # A matching checkpoint needs no permission; a typo'd prefix is an error.
    run_main(
        config,
        f"train.init_checkpoint={paths['good']}",
        f"train.output_dir={tmp_path / 'good'}",
        *common,
    )
    with pytest.raises(ValueError, match="no model key starts with"):
        run_main(
            config,
            f"train.init_checkpoint={paths['missing']}",
            f"train.output_dir={tmp_path / 'typo'}",
            "train.init_partial=['decodr.']",
            *common,
        )
