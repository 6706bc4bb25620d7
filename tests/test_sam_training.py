"""Training the box-prompted segmenter (transformers' SamModel) with the project's engine: SAM's
losses, and the demo's mask stage trained for a few iterations on the shapes' masks."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.segment import MaskStage
from grounding_dino.segment.data import _resize_and_pad, jitter_boxes
from grounding_dino.segment.loss import dice_loss, mask_iou, sam_mask_losses
from grounding_dino.shapes_demo.masks import train_mask_stage


def test_losses_by_hand():
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1.0  # 4 pixels
    logits = torch.full((1, 4, 4), -20.0)
    logits[0, :2, :3] = 20.0  # 6 pixels, 4 of them right: IoU 4/6
    assert mask_iou(logits, target).item() == pytest.approx(4 / 6)
    # sigmoid(+-20) is 1 / 0 to 2e-9: dice = 1 - 2 * 4 / (6 + 4) with smoothing 0.
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.2, abs=1e-6)
    losses = sam_mask_losses(logits, target, torch.tensor([4 / 6]))
    assert losses["loss_mask_iou"].item() == pytest.approx(0.0, abs=1e-12)
    # Focal loss: the 2 wrong pixels cost about alpha' (1 - p)^2 * 20 = 0.75 * 20 each, over 16
    # pixels, times the weight 20.
    assert losses["loss_mask_focal"].item() == pytest.approx(20 * 2 * 0.75 * 20 / 16, rel=1e-3)
    with pytest.raises(ValueError, match="same K masks"):
        sam_mask_losses(logits, target[:, :2], torch.tensor([0.5]))


def test_jitter_boxes_stays_in_the_image_and_near_the_box():
    boxes = np.array([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 100.0, 100.0]])
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = jitter_boxes(boxes, (100, 200), rng, std=0.1, max_shift=0.02)
        assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
        assert (out >= 0).all() and (out[:, 0::2] <= 200).all() and (out[:, 1::2] <= 100).all()
        assert np.abs(out - boxes).max() <= 0.02 * 200 + 1e-6  # at most 4 px


@pytest.mark.slow
def test_demo_mask_stage_trains_and_writes_a_sam_folder(tmp_path, capsys):
    """A few iterations of configs/sam_shapes.py on 6 shapes images: the loss goes down, the
    segmenter lands as a transformers folder that MaskStage loads, and a second run with the
    same config reuses it."""
    shapes = dict(image_size=256, num_train=6, num_val=2)
    register_shapes_datasets(root=str(tmp_path / "shapes"), **shapes)
    overrides = [
        "train.max_iter=12",
        "train.log_period=1",
        "lr_multiplier.warmup_iters=1",
        "optimizer.lr=5e-3",
        "dataloader.train.total_batch_size=2",
    ]
    out = str(tmp_path / "out")
    root = str(tmp_path / "shapes")
    stage, info = train_mask_stage(out, shapes, shapes_root=root, overrides=overrides)
    assert not info["sam_reused"] and info["sam_iterations"] == 12
    folder = os.path.join(out, "sam")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    # metrics.json holds the median of the last 20 iterations' losses (detectron2's writer).
    with open(os.path.join(out, ".sam_training", "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert len(losses) == 12 and losses[-1] < 0.95 * losses[0], losses
    image = np.zeros((256, 256, 3), np.uint8)
    output = MaskStage.from_pretrained(folder)(image, torch.tensor([[10.0, 10.0, 60.0, 50.0]]))
    assert output.masks.shape == (1, 256, 256) and output.scores.shape == (1,)
    again, info = train_mask_stage(out, shapes, shapes_root=root, overrides=overrides)
    assert info["sam_reused"] and "reusing the segmenter" in capsys.readouterr().out
    assert isinstance(again, MaskStage)
    # Training again gives the same segmenter: seeded initialisation, sampler and prompts.
    first = {k: v.clone() for k, v in again.model.state_dict().items()}
    retrained, info = train_mask_stage(
        out, shapes, shapes_root=root, overrides=overrides, retrain=True
    )
    assert not info["sam_reused"]
    second = retrained.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first), "retraining differs"


@pytest.mark.slow
def test_finetune_sam_coco_format_from_the_command_line(tmp_path):
    """``train_net.py --config-file configs/finetune_sam_coco_format.py`` on a user's SAM folder
    and COCO polygons: the fine-tuned SAM lands as a folder, its image encoder unchanged
    (frozen by default) and its mask decoder trained."""
    import subprocess
    import sys

    import cv2
    from safetensors.torch import load_file

    from sam_reference import tiny_segmenter_folder

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, _, user_dir = tiny_segmenter_folder("sam", tmp_path / "my_sam")
    os.makedirs(tmp_path / "images")
    images, annotations = [], []
    for i in (1, 2):
        image = np.full((48, 64, 3), 90, np.uint8)
        image[8 : 8 + 10 * i, 10:40] = (230, 40, 40)
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), image)
        images.append({"id": i, "file_name": f"{i}.png", "height": 48, "width": 64})
        polygon = [10, 8, 40, 8, 40, 8 + 10 * i, 10, 8 + 10 * i]
        annotations.append(
            dict(id=i, image_id=i, category_id=1, bbox=[10, 8, 30, 10 * i], area=300.0 * i)
        )
        annotations[-1].update(segmentation=[polygon], iscrowd=0)
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(repo, "train_net.py"), "--config-file"]
    command += [os.path.join(repo, "configs", "finetune_sam_coco_format.py")]
    command += [f"sam.path={user_dir}", f"dataset.train_json={tmp_path / 'train.json'}"]
    command += [f"dataset.train_images={tmp_path / 'images'}", f"train.output_dir={out}"]
    command += ["train.device=cpu", "train.max_iter=3", "dataloader.train.total_batch_size=2"]
    command += ["dataloader.train.num_workers=0", "optimizer.lr=1e-2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    before = load_file(os.path.join(user_dir, "model.safetensors"))
    after = load_file(str(out / "sam" / "model.safetensors"))
    assert before.keys() == after.keys()
    encoder = [k for k in before if k.startswith("vision_encoder.")]
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert MaskStage.from_pretrained(str(out / "sam")).kind == "sam"


def test_unresized_masks_are_padded_as_the_resize_would():
    masks = torch.rand(3, 20, 30) > 0.5
    fast = _resize_and_pad(masks, [20, 30], (32, 32))  # no resize: the shortcut
    resized = F.pad(
        F.interpolate(masks[:, None].float(), size=(20, 30), mode="bilinear"), (0, 2, 0, 12)
    )
    assert fast.dtype == torch.uint8 and fast.shape == (3, 32, 32)
    assert torch.equal(fast, (resized[:, 0] >= 0.5).to(torch.uint8))
    assert _resize_and_pad(masks, [10, 15], (16, 16)).shape == (3, 16, 16)  # resized path
