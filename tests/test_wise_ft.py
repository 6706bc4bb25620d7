"""
Weight-space ensembling (``python -m grounding_dino.finetune wise-ft``): alpha 0 and 1 are
the two checkpoints exactly, the interpolations are refused across architectures, and the
command evaluates every alpha on the target and the retention sets, writes the table, the
curve and the checkpoints, names the alpha to use, and never overwrites.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from test_finetune_lora import raw_outputs
from test_finetune_recipes import RECIPE_CONFIG
from test_own_data import REPO, dataset_overrides, write_dataset

from grounding_dino.checkpoint import CheckpointMismatchError
from grounding_dino.finetune.wise_ft import (
    choose_alpha,
    interpolate_state_dicts,
    load_model_state,
)


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wise_ft")
    finetuned = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    torch.save({"model": tiny_model.state_dict()}, folder / "base.pth")
    torch.save({"model": finetuned.state_dict(), "iteration": 299}, folder / "finetuned.pth")
    return folder, finetuned


def test_alpha_0_and_1_are_the_two_checkpoints_exactly(tiny_model, two_checkpoints):
    folder, finetuned = two_checkpoints
    model = copy.deepcopy(tiny_model)
    base = load_model_state(str(folder / "base.pth"), model)
    tuned = load_model_state(str(folder / "finetuned.pth"), model)
    image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)
    for alpha, reference in ((0.0, tiny_model), (1.0, finetuned)):
        state = interpolate_state_dicts(base, tuned, alpha)
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
        model.load_state_dict(state, strict=True)
        assert torch.equal(raw_outputs(model, image), raw_outputs(reference, image))
    half = interpolate_state_dicts(base, tuned, 0.5)
    key = "decoder.layers.0.linear1.weight"
    assert torch.allclose(half[key], (base[key] + tuned[key]) / 2)


def test_interpolation_refuses_other_architectures(tiny_model, two_checkpoints, tmp_path):
    folder, _ = two_checkpoints
    state = dict(torch.load(folder / "base.pth")["model"])
    del state["decoder.layers.0.linear1.weight"]
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="decoder.layers.0.linear1.weight"):
        load_model_state(str(tmp_path / "other.pth"), tiny_model)
    counter = {"n": torch.tensor(1)}
    with pytest.raises(ValueError, match="integer tensors differ"):
        interpolate_state_dicts(counter, {"n": torch.tensor(2)}, 0.5)


def test_choose_alpha_keeps_the_most_retention_within_the_target_loss():
    rows = [
        dict(alpha=0.0, target=30.0, retention=80.0),
        dict(alpha=0.5, target=97.5, retention=70.0),
        dict(alpha=0.75, target=98.6, retention=60.0),
        dict(alpha=1.0, target=99.0, retention=46.0),
    ]
    assert choose_alpha(rows, 1.0)["alpha"] == 0.75
    assert choose_alpha(rows, 2.0)["alpha"] == 0.5
    assert choose_alpha(rows, 0.0)["alpha"] == 1.0


@pytest.mark.slow
def test_the_command_writes_table_curve_and_checkpoints_and_never_overwrites(
    two_checkpoints, tmp_path
):
    folder, _ = two_checkpoints
    data = write_dataset(str(tmp_path / "data"), num_train=1, num_test=2)
    (tmp_path / "config.py").write_text(RECIPE_CONFIG)
    out = str(tmp_path / "curve")
    command = [
        sys.executable,
        "-m",
        "grounding_dino.finetune",
        "wise-ft",
        str(tmp_path / "config.py"),
        str(folder / "base.pth"),
        str(folder / "finetuned.pth"),
        "--output",
        out,
        "--alphas",
        "0,0.5,1",
        *dataset_overrides(data),
        "train.device=cpu",
        "dataloader.test.num_workers=0",
        f"train.output_dir={tmp_path}/eval",
        "dataloader.retention=[base_test]",
    ]
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(f"{out}/wise_ft.json") as f:
        summary = json.load(f)
    assert [r["alpha"] for r in summary["rows"]] == [0.0, 0.5, 1.0]
    for row in summary["rows"]:
        assert 0 <= row["target"] <= 100 and set(row["per_set"]) == {"base_test"}
        assert os.path.isfile(row["checkpoint"])
    assert summary["chosen"] == choose_alpha(summary["rows"], 1.0)
    assert "| alpha | target bbox/AP50 |" in result.stdout
    assert "keeps the most retention" in result.stdout or "No alpha keeps" in result.stdout
    with open(f"{out}/wise_ft.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    interpolated = torch.load(f"{out}/wise_ft_alpha0.00.pth")["model"]
    base = torch.load(folder / "base.pth")["model"]
    assert all(torch.equal(interpolated[k], base[k]) for k in base)
    # A second run into the same folder stops before any work, naming the files.
    before = os.path.getmtime(f"{out}/wise_ft.json")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 1 and "already holds" in again.stderr
    assert os.path.getmtime(f"{out}/wise_ft.json") == before
