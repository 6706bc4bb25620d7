"""
Training: one step of a tiny Grounding DINO (gradients reach exactly the trainable
parameters), the trainer's clipping and non-finite-loss stop, the optimizer groups and LR
schedule, the shipped configs, and ``train_net.py`` in subprocesses (overrides, ``--resume``,
evaluation, two gloo workers on the CPU).
"""

import json
import math
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf
from torch import nn

from grounding_dino.checkpoint import GroundingDINOCheckpointer
from grounding_dino.engine import (
    GroundingTrainer,
    LastGoodCheckpointer,
    clip_gradients,
    get_param_groups,
    lr_factor_of,
    step_milestones,
    warmup_step_schedule,
)
from grounding_dino.text import positive_map_from_spans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# A complete tiny training config, written next to its fixture data (coco.json, images/).
# It registers the fixture dataset itself, so that every spawned worker has it too.
TINY_CONFIG = """
import os

from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from omegaconf import OmegaConf

from grounding_dino.data.datasets import get_thing_classes
from grounding_dino.data.mapper import GroundingDatasetMapper
from grounding_dino.evaluation import build_evaluator
from grounding_dino.model_zoo import get_config
from grounding_dino.modeling import build_image_backbone
from grounding_dino.text.tokenizer import local_bert_dir

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "tiny_fixture_" + str(abs(hash(HERE)) % 10**8)
if NAME not in DatasetCatalog.list():
    register_coco_instances(
        NAME, {{}}, os.path.join(HERE, "coco.json"), os.path.join(HERE, "images")
    )

# The packaged model tree, made small.
model = get_config("common/models/grounding_dino_swin_t.py").model
model.hidden_dim = 64
model.backbone = L(build_image_backbone)(
    name="TinyCNNBackbone", channels=(8, 16, 32, 48, 64), convs_per_stage=1, num_outputs=3,
    frozen_stages=-1,
)
model.neck.in_channels = (32, 48, 64)
model.text_encoder.update(name_or_path=local_bert_dir(), freeze=True)
model.enhancer.update(
    num_layers=2, ffn_dim=64, num_heads=4, num_points=2, text_heads=2, text_ffn_dim=64,
    fusion_dim=64, fusion_heads=2, fusion_drop_path=0.0,
)
model.query_selector.num_queries = 30
model.decoder.update(num_layers=2, num_heads=4, ffn_dim=64, num_points=2)
model.dn_number = 4

optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/schedule.py").lr_multiplier
lr_multiplier.warmup_iters = 1
train = get_config("common/train.py").train
_mapper = dict(
    tokenizer="${{model.text_encoder.name_or_path}}",
    thing_classes=L(get_thing_classes)(name=NAME),
    max_text_len="${{model.max_text_len}}",
    drop_warning_period=1000,
)
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=NAME, filter_empty=False),
    mapper=L(GroundingDatasetMapper)(
        is_train=True, augmentations=[L(T.RandomFlip)(prob=0.5)], **_mapper
    ),
    total_batch_size=2,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names=NAME, filter_empty=False),
    mapper=L(GroundingDatasetMapper)(is_train=False, augmentations=[], **_mapper),
    num_workers=0,
)
dataloader.evaluator = L(build_evaluator)(
    dataset_name=NAME, output_dir="${{train.output_dir}}/inference"
)

train.output_dir = os.path.join(HERE, "output")
train.device = "cpu"
train.max_iter = 2
train.checkpointer.period = 2
train.log_period = 1
train.eval_period = 0
train.seed = 0
"""

CATEGORIES = ["red square", "blue circle"]


def write_fixture(root) -> str:
    """Three 96x128 images (the last without objects), a COCO json and the tiny config."""
    images, annotations = [], []
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    boxes = {1: [(1, [8, 10, 40, 30]), (2, [60, 30, 50, 50])], 2: [(2, [20, 20, 44, 44])], 3: []}
    for image_id, objects in boxes.items():
        image = np.full((96, 128, 3), 200, np.uint8)
        for category, (x, y, w, h) in objects:
            color = (0, 0, 220) if category == 1 else (220, 0, 0)  # BGR
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), color, -1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id}.png"
        cv2.imwrite(os.path.join(root, "images", file_name), image)
        images.append({"id": image_id, "file_name": file_name, "height": 96, "width": 128})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    path = os.path.join(root, "tiny.py")
    with open(path, "w") as f:
        f.write(TINY_CONFIG.format(repo=REPO))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return write_fixture(str(tmp_path_factory.mktemp("tiny")))


def batch(tokenizer, generator=None):
    """An image with two objects and an image without any (96x128; random pixels from
    ``generator``, default torch's global one)."""
    caption = "red square . blue circle ."
    tokenized = tokenizer(caption, return_offsets_mapping=True)
    records = []
    for boxes, spans, classes in (
        ([[8.0, 10.0, 48.0, 40.0], [60.0, 30.0, 110.0, 80.0]], [[(0, 10)], [(13, 24)]], [0, 1]),
        (torch.zeros(0, 4), [], []),
    ):
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.as_tensor(classes, dtype=torch.long)
        instances.gt_positive_map = positive_map_from_spans(tokenized, spans, 256).reshape(-1, 256)
        image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator)
        records.append(
            {"image": image, "caption": caption, "instances": instances, "height": 96, "width": 128}
        )
    return records


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    cfg = LazyConfig.load(tiny_config, "model")
    cfg.backbone.frozen_stages = 0  # the stem and the first stage
    return instantiate(cfg).train()


def test_one_step_gradients_reach_exactly_the_trainable_parameters(tiny_model):
    model = tiny_model
    model.zero_grad(set_to_none=True)
    with EventStorage():
        losses = model(batch(model.tokenizer))
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_enc", "loss_class_dn"} <= set(
        losses
    )
    sum(losses.values()).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("text_encoder.bert.") for n in frozen)
    assert any(n.startswith("backbone.") for n in frozen)  # model.backbone.frozen_stages
    assert any(n.startswith("backbone.") for n, _ in trainable)
    assert not any(n.startswith("text_encoder.feat_map") for n in frozen)
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"trainable parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert sum(float(p.grad.norm()) for _, p in trainable) > 0


def test_param_groups_and_clipped_trainer_step(tiny_model):
    model = tiny_model
    groups = get_param_groups(
        model,
        base_lr=1e-4,
        weight_decay=1e-4,
        backbone_lr_multiplier=0.1,
        text_encoder_lr_multiplier=0.1,
    )
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(lr_of) == sum(p.requires_grad for p in names.values())  # frozen left out
    for name, param in names.items():
        if not param.requires_grad:
            assert id(param) not in lr_of
        elif name.startswith(("backbone.", "text_encoder.bert.")):
            assert lr_of[id(param)] == pytest.approx(1e-5), name
        else:  # the neck's projections train at the base rate, as in Open-GroundingDino
            assert lr_of[id(param)] == pytest.approx(1e-4), name
    assert any(n.startswith("neck.") and id(p) in lr_of for n, p in names.items())

    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
    data = [batch(model.tokenizer)]
    trainer = GroundingTrainer(
        model, data, optimizer, clip_grad={"enabled": True, "max_norm": 0.1, "norm_type": 2.0}
    )
    before = {n: p.detach().clone() for n, p in names.items()}
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.storage = storage
        trainer.run_step()
        grad_norm = storage.history("grad_norm").latest()
    clipped = math.sqrt(
        sum(float(p.grad.norm()) ** 2 for p in names.values() if p.grad is not None)
    )
    assert grad_norm > 0.1  # the raw norm was above the limit...
    assert clipped == pytest.approx(0.1, rel=1e-3)  # ...and the step used clipped gradients
    changed = [n for n, p in names.items() if not torch.equal(before[n], p)]
    assert all(names[n].requires_grad for n in changed)
    assert any(n.startswith("backbone.") for n in changed)
    assert not any(n.startswith("text_encoder.bert.") for n in changed)


class _Toy(nn.Module):
    """Loss = (w - 1)^2; NaN from iteration ``nan_at`` on."""

    def __init__(self, nan_at):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, data):
        self.calls += 1
        loss = ((self.weight - 1) ** 2).sum()
        bad = loss * float("nan") if self.calls > self.nan_at else loss
        return {"loss_a": loss, "loss_b": bad}


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    model = _Toy(nan_at=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = GroundingTrainer(
        model, [0] * 10, optimizer, clip_grad={"enabled": True, "max_norm": 100.0, "norm_type": 2.0}
    )
    checkpointer = GroundingDINOCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([LastGoodCheckpointer(checkpointer)])
    with pytest.raises(FloatingPointError) as error:
        trainer.train(0, 10)
    message = str(error.value)
    assert "iteration 3" in message and "loss_b" in message and "loss_a" in message
    good = 1 - 0.6**3  # three SGD steps on 2 (w - 1)^2 with lr 0.1
    assert torch.allclose(model.weight.detach(), torch.full((3,), good))
    saved = torch.load(tmp_path / "model_last_good.pth", weights_only=True)
    assert saved["iteration"] == 2 and saved["trainer"]["iteration"] == 2
    assert torch.allclose(saved["model"]["weight"], torch.full((3,), good))
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_last_good.pth"


def test_clip_gradients_uses_one_norm_over_all_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    norm = clip_gradients([a, b, nn.Parameter(torch.zeros(1))], max_norm=0.1)
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.06, 0.0, 0.0, 0.08]))


def test_schedule_and_multipliers():
    schedule = warmup_step_schedule(100, steps=(0.5, 0.8), warmup_iters=10, warmup_factor=0.001)
    values = [schedule(i / 100) for i in (0, 5, 10, 49, 50, 80, 99)]
    assert values == pytest.approx([0.001, 0.5005, 1.0, 1.0, 0.1, 0.01, 0.01])
    assert step_milestones(3, [0.5, 0.9]) == [2]  # 0.9 * 3 rounds to 3: no room left
    assert warmup_step_schedule(1, warmup_iters=0)(0.0) == 1.0
    with pytest.raises(ValueError, match="increasing fractions"):
        step_milestones(100, [0.8, 0.5])
    multipliers = {"backbone.": 0.1, "backbone.layers.0.": 0.0}
    assert lr_factor_of("backbone.layers.0.x", multipliers) == 0.0
    assert lr_factor_of("backbone.layers.1.x", multipliers) == 0.1
    assert lr_factor_of("decoder.x", multipliers) == 1.0


@pytest.mark.parametrize(
    "name", ["finetune_coco_swin_t", "finetune_refcoco_swin_t", "pretrain_swin_t_o365_goldg"]
)
def test_configs_load_override_and_save_as_yaml(name, tmp_path):
    cfg = LazyConfig.load(os.path.join(REPO, "configs", f"{name}.py"))
    cfg = LazyConfig.apply_overrides(
        cfg, ["train.max_iter=100", "model.query_selector.num_queries=50", "optimizer.lr=2e-4"]
    )
    for key in ("train.output_dir", "train.init_checkpoint", "train.checkpointer.period"):
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.dataloader.train.total_batch_size > 0 and "evaluator" in cfg.dataloader
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    assert path.exists() and not (tmp_path / "config.yaml.pkl").exists()
    again = LazyConfig.load(str(path))
    assert again.model.query_selector.num_queries == 50 and again.optimizer.lr == 2e-4
    assert again.optimizer.params.base_lr == 2e-4  # "${..lr}" follows the override
    assert again.lr_multiplier.max_iter == 100
    assert again.train.clip_grad.max_norm == 0.1


def test_variant_config_changes_its_parent():
    parent = LazyConfig.load(os.path.join(REPO, "configs", "finetune_coco_swin_t.py"))
    variant = LazyConfig.load(os.path.join(REPO, "configs", "finetune_refcoco_swin_t.py"))
    assert variant.train.init_checkpoint == parent.train.init_checkpoint != ""
    assert variant.optimizer.lr == parent.optimizer.lr
    assert variant.model.text_encoder.freeze is True
    assert parent.model.text_encoder.freeze is False
    assert variant.dataloader.train.dataset.names == "refcoco_train"
    assert parent.dataloader.train.dataset.names == "coco_2017_train"
    assert variant.train.max_iter < parent.train.max_iter


def run_train_net(config, *opts, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [PYTHON, os.path.join(REPO, "train_net.py"), "--config-file", config, *opts],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_train_net_two_workers_override_resume_and_eval(tiny_config):
    """
    Two gloo workers on the CPU train 2 iterations with an override of the model; then one
    process resumes to iteration 4 and evaluates.
    """
    output_dir = os.path.join(os.path.dirname(tiny_config), "output")
    output = run_train_net(
        tiny_config,
        "--num-gpus",
        "2",
        "train.device=cpu",
        "train.max_iter=2",
        "model.query_selector.num_queries=7",
    )
    assert "World size: 2" in output
    assert os.path.exists(os.path.join(output_dir, "log.txt.rank1"))  # the second worker ran
    final = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=True)
    assert final["model"]["query_selector.tgt_embed.weight"].shape == (7, 64)  # override reached
    assert final["iteration"] == 1 and "optimizer" in final["trainer"]
    metrics = read_metrics(output_dir)
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1]
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(output_dir))

    output = run_train_net(
        tiny_config, "--resume", "train.max_iter=4", "model.query_selector.num_queries=7"
    )
    assert "Starting training from iteration 2" in output
    assert re.search(r"eta: \S+\s+iter: 3", output), output[-3000:]  # console progress + ETA
    assert "Evaluation results for bbox" in output  # the eval hook ran the evaluator
    metrics = read_metrics(output_dir)
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1, 2, 3]
    resumed = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=True)
    assert resumed["iteration"] == 3
    assert resumed["trainer"]["hooks"]["LRScheduler"]["last_epoch"] >= 3


def load_train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_main_nonfinite_stop_then_eval_only(tiny_config, tmp_path):
    train_net = load_train_net()
    parser = train_net.default_argument_parser()
    common = ["--config-file", tiny_config]
    out = str(tmp_path / "run")
    args = parser.parse_args(
        common + [f"train.output_dir={out}", "model.criterion.weight_dict={loss_bbox:inf}"]
    )
    with pytest.raises(FloatingPointError, match=r"iteration 0: non-finite losses .*loss_bbox"):
        train_net.main(args)
    assert os.path.exists(os.path.join(out, "model_last_good.pth"))

    args = parser.parse_args(
        common
        + ["--eval-only", f"train.output_dir={out}", f"train.init_checkpoint={out}/model_0.pth"]
    )
    with pytest.raises(FileNotFoundError, match="model_0.pth"):
        train_net.main(args)  # a missing checkpoint is an error, not a silent random model
    args = parser.parse_args(
        common + ["--eval-only", "--resume", f"train.output_dir={out}", "train.device=cpu"]
    )
    results = train_net.main(args)  # evaluates the last checkpoint: model_last_good.pth
    assert set(results["bbox"]) >= {"AP", "AP50"}


def test_amp_choice():
    from grounding_dino.engine import build_trainer, use_amp

    assert use_amp({"amp": {"enabled": True}, "device": "cuda"})
    assert use_amp({"amp": {"enabled": "auto"}, "device": "cuda:0"})
    assert not use_amp({"amp": {"enabled": "auto"}, "device": "cpu"})
    assert not use_amp({"amp": {"enabled": False}, "device": "cuda:0"})
    # True on the CPU is bf16 autocast (tests/test_mixed_precision.py); fp16 there is an
    # error, not float32 without a word.
    with pytest.raises(ValueError, match="train.amp.dtype=fp16 on train.device=cpu"):
        use_amp({"amp": {"enabled": True, "dtype": "fp16"}, "device": "cpu"})
    with pytest.raises(ValueError, match="must be True, False or 'auto', got 'yes'"):
        use_amp({"amp": {"enabled": "yes"}, "device": "cpu"})
    model = _Toy(nan_at=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = {"amp": {"enabled": "auto"}, "device": "cpu", "clip_grad": None}
    trainer = build_trainer(train, model, [0], optimizer)
    assert type(trainer) is GroundingTrainer
