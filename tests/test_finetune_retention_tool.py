"""
``tools/finetune_retention.py`` run as a user runs it, on a stand-in for ``make demo``'s
output (the tiny demo model with random weights, small shapes datasets), a few iterations per
recipe: every recipe row, the WiSE-FT table and the plot are written; an existing output
folder is refused.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from test_own_data import REPO

from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.model_zoo import get_config


@pytest.mark.slow
def test_the_tool_on_a_stand_in_demo_model(tmp_path, tiny_model):
    demo = tmp_path / "demo"
    cfg = get_config("shapes_tiny.py")
    cfg.shapes = dict(image_size=192, num_train=8, num_val=4)
    cfg.dataloader.test.mapper.augmentations.update(min_size=192, max_size=192)
    os.makedirs(demo)
    LazyConfig.save(cfg, str(demo / "config.yaml"))
    register_shapes_datasets(root=str(demo / "shapes"), prefix="standin", **cfg.shapes)
    torch.save({"model": tiny_model.state_dict()}, demo / "model_final.pth")
    out = str(tmp_path / "out")
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "finetune_retention.py"),
        "--demo-dir",
        str(demo),
        "--output",
        out,
        "--max-iter",
        "2",
        "--num-train",
        "4",
        "--num-val",
        "2",
        "--recipes",
        "full",
        "LoRA",
        "--alphas",
        "0,1",
    ]
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with open(f"{out}/results.json") as f:
        results = json.load(f)
    full, lora = results["recipes"]
    assert (full["recipe"], lora["recipe"]) == ("full", "LoRA")
    assert lora["trainable"] < full["trainable"] / 5
    assert lora["checkpoint_mb"] < full["checkpoint_mb"] / 5
    for row in results["recipes"]:
        assert 0 <= row["target"] <= 100 and 0 <= row["retention"] <= 100
    # WiSE-FT alpha 1 is the full fine-tune: the same scores.
    alpha1 = results["wise_ft"]["rows"][-1]
    assert alpha1["alpha"] == 1.0
    assert alpha1["target"] == pytest.approx(full["target"], abs=1e-6)
    assert alpha1["retention"] == pytest.approx(full["retention"], abs=1e-6)
    assert "| LoRA |" in result.stdout and "WiSE-FT" in result.stdout
    with open(f"{out}/tradeoff.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
