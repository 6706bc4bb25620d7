"""
Misspelt settings are errors (issue 32, item 5): unknown ``key=value`` override keys name the
closest known key wherever overrides are applied (``train_net.py``, ``model_zoo``, the yacs
bridge), ``+key=value`` adds a key on purpose, and every dataset path of a run is checked
before the first iteration.
"""

import os
import subprocess
import sys
import uuid

import pytest
from detectron2.config import LazyConfig, get_cfg
from detectron2.data.datasets import register_coco_instances
from omegaconf import OmegaConf
from test_own_data import FAST, WAY1_CONFIG, dataset_overrides, write_dataset

from grounding_dino import add_grounding_dino_config
from grounding_dino.config import load_lazy_config_from_yacs
from grounding_dino.config_overrides import UnknownConfigKeyError, apply_overrides
from grounding_dino.engine.dataset_checks import check_dataset_paths
from grounding_dino.model_zoo import get_config, get_config_file, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _train_net(*args, timeout=240):
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *map(str, args)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def shapes_cfg():
    return LazyConfig.load(get_config_file("shapes_tiny.py"))


# --------------------------------------------------------------------- the override rule
@pytest.mark.parametrize(
    "override, closest",
    [
        ("train.max_iterr=1", "train.max_iter"),
        ("train.init_checkpiont=W", "train.init_checkpoint"),
        ("model.query_selector.num_querys=30", "model.query_selector.num_queries"),
        ("model.box_treshold=0.3", "model.box_threshold"),
        # an argument of the node's _target_ the config leaves at its default
        ("dataloader.train.aspect_ratio_groupin=False", "dataloader.train.aspect_ratio_grouping"),
    ],
)
def test_unknown_keys_name_the_closest_known_key(shapes_cfg, override, closest):
    cfg = shapes_cfg.copy()
    with pytest.raises(UnknownConfigKeyError) as error:
        apply_overrides(cfg, [override])
    key = override.split("=")[0]
    message = str(error.value)
    assert f"unknown config key {key!r}" in message
    assert f"did you mean {closest!r}?" in message
    assert f"+{override}" in message  # how to add it on purpose
    assert OmegaConf.select(cfg, key, default="absent") == "absent"  # nothing was created


def test_known_keys_target_arguments_and_plus_keys(shapes_cfg):
    cfg = apply_overrides(
        shapes_cfg.copy(),
        [
            "train.max_iter=7",
            "model.query_selector.num_queries=30",
            # not in the config, but an argument of build_detection_train_loader (a
            # detectron2 @configurable function): known
            "dataloader.train.aspect_ratio_grouping=False",
            "+train.my_note=hello",  # a new key, on purpose
            "++train.my_note=again",  # set whether it exists or not
            "++train.other=1",
        ],
    )
    assert cfg.train.max_iter == 7 and cfg.model.query_selector.num_queries == 30
    assert cfg.dataloader.train.aspect_ratio_grouping is False
    assert cfg.train.my_note == "again" and cfg.train.other == 1
    with pytest.raises(UnknownConfigKeyError, match="train.max_iter already exists; '\\+' adds"):
        apply_overrides(cfg, ["+train.max_iter=3"])
    with pytest.raises(UnknownConfigKeyError, match="train.max_iter is 7, not a config node"):
        apply_overrides(cfg, ["train.max_iter.x=3"])


def test_every_entry_point_checks_the_keys(tmp_path):
    # model_zoo (the predictors, demos, labeller, exporter and tools load through it)
    with pytest.raises(UnknownConfigKeyError, match="did you mean 'model.box_threshold'"):
        get_config("shapes_tiny.py", ["model.box_treshold=0.3"])
    with pytest.raises(UnknownConfigKeyError, match="did you mean 'model.max_detections'"):
        load_config(get_config_file("shapes_tiny.py"), ["model.max_detection=5"])
    # the yacs bridge's MODEL.GROUNDING_DINO.OVERRIDES
    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = get_config_file("shapes_tiny.py")
    cfg.MODEL.GROUNDING_DINO.OVERRIDES = ["model.text_treshold=0.2"]
    with pytest.raises(UnknownConfigKeyError, match="did you mean 'model.text_threshold'"):
        load_lazy_config_from_yacs(cfg)
    cfg.MODEL.GROUNDING_DINO.OVERRIDES = ["model.text_threshold=0.2"]
    assert load_lazy_config_from_yacs(cfg).model.text_threshold == 0.2


@pytest.mark.parametrize(
    "override, closest",
    [("train.max_iterr=1", "train.max_iter"), ("train.init_checkpiont=W", "train.init_checkpoint")],
)
def test_train_net_refuses_a_misspelt_key(tmp_path, override, closest):
    rc, log = _train_net(
        "--config-file",
        get_config_file("shapes_tiny.py"),
        f"train.output_dir={tmp_path}/out",
        override,
    )
    assert rc != 0
    assert f"did you mean {closest!r}?" in log, log[-3000:]
    assert "Starting training" not in log and not os.path.exists(tmp_path / "out")


def test_train_net_refuses_fp16_amp_on_the_cpu(tmp_path):
    rc, log = _train_net(
        "--config-file",
        get_config_file("shapes_tiny.py"),
        f"train.output_dir={tmp_path}/out",
        "train.amp.enabled=True",
        "train.amp.dtype=fp16",
    )
    message = "train.amp.enabled=True with train.amp.dtype=fp16 on train.device=cpu"
    assert rc != 0 and message in log, log[-3000:]
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- dataset paths up front
def test_train_net_checks_the_test_json_before_iteration_one(tmp_path):
    data = write_dataset(str(tmp_path / "data"), num_train=2, num_test=1)
    config = tmp_path / "finetune_tiny.py"
    config.write_text(WAY1_CONFIG)
    missing = tmp_path / "val.json"
    overrides = dataset_overrides(data)[:2] + [
        f"dataset.test_json={missing}",
        f"dataset.test_images={data}/images",
    ]
    rc, log = _train_net(
        "--config-file",
        config,
        *overrides,
        f"train.output_dir={tmp_path}/out",
        *[o for o in FAST if not o.startswith("train.eval_period")],
        "train.eval_period=2",  # the first evaluation would come after 2 iterations
        timeout=180,
    )
    assert rc != 0
    assert f"dataset.test_json={missing}: no such file" in log, log[-3000:]
    assert "Starting training" not in log
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_registered_dataset_files_are_checked_with_their_field(tmp_path):
    name = f"missing_json_{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp_path / "images")
    register_coco_instances(name, {}, str(tmp_path / "nope.json"), str(tmp_path / "images"))
    cfg = OmegaConf.create({"dataloader": {"test": {"dataset": {"names": name}}}})
    with pytest.raises(FileNotFoundError) as error:
        check_dataset_paths(cfg)
    assert str(error.value).startswith(
        f"dataloader.test.dataset.names: dataset {name!r} reads "
        f"json_file={tmp_path / 'nope.json'}: no such file"
    )
    cfg.dataloader.test.dataset.names = [f"{name}_unregistered"]
    with pytest.raises(KeyError, match="is not registered"):
        check_dataset_paths(cfg)
