"""
LoRA fine-tuning (``train.lora``, ``grounding_dino.finetune``): every adapter changes the
output, including those on layers whose weights are read directly (the folded image-text
attention, the deformable offsets, the packed in_proj_weight); merged weights give the adapter
model's outputs; a LoRA run's checkpoint holds only the adapter and loads strictly onto the
base; ``merge-lora`` writes plain weights that the predictor and the export load.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_own_data import FAST, REPO, WAY1_CONFIG, dataset_overrides, run_train_net, write_dataset

from grounding_dino.checkpoint import CheckpointMismatchError
from grounding_dino.convert.checkpoint import load_checkpoint_file
from grounding_dino.finetune.lora import LORA_PARAMETERS, LORA_TARGETS, add_lora, merge_lora
from grounding_dino.finetune.merge import load_lora_model
from grounding_dino.model_zoo import build_model, get_config


def raw_outputs(model, image, caption="red circle . blue square . green star ."):
    """Token logits and boxes of the network (eval mode, no post-processing), flattened."""
    (normalised,) = model.preprocess_image([{"image": image}])
    runs = model.prompt_encoder.runs_for_input(0, {"caption": caption})
    with torch.no_grad():
        out = model.forward_transformer([normalised], runs)
    logits = out["pred_logits"][torch.isfinite(out["pred_logits"])]
    return torch.cat([logits.flatten(), out["pred_boxes"].flatten()])


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 128, 160), generator=generator, dtype=torch.uint8)


def adapted(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    tuner = add_lora(model, {"rank": 2, "alpha": 4.0})
    return model, tuner


def test_every_adapter_changes_the_output(tiny_model, image):
    model, _ = adapted(tiny_model)
    base = raw_outputs(tiny_model, image)
    # peft starts B at zero: the adapted model is the base model.
    assert torch.equal(raw_outputs(model, image), base)
    b_weights = {n: p for n, p in model.named_parameters() if ".lora_B." in n}
    adapted_names = {n.split(".lora_B.")[0].rsplit(".", 1)[-1] for n in b_weights}
    assert adapted_names == set(LORA_TARGETS) | {"self_attn", "ca_text"}  # in_proj_weight's
    assert len(b_weights) == 62  # 2 enhancer layers x 15 + 3 decoder layers x 8 + 8 in_proj
    # With B = 0 the output is linear in each B to first order: an adapter changes the output
    # exactly when the output's gradient with respect to its B is not zero. One backward pass
    # (eval mode: the folded attention and the pixel-location offsets) checks all of them.
    (normalised,) = model.preprocess_image([{"image": image}])
    runs = model.prompt_encoder.runs_for_input(0, {"caption": "red circle . blue square ."})
    out = model.forward_transformer([normalised], runs)
    logits = out["pred_logits"].masked_fill(~torch.isfinite(out["pred_logits"]), 0)
    generator = torch.Generator().manual_seed(2)
    probe = (logits * torch.randn(logits.shape, generator=generator)).sum()
    probe = (
        probe
        + (out["pred_boxes"] * torch.randn(out["pred_boxes"].shape, generator=generator)).sum()
    )
    probe.backward()
    unused = [n for n, p in b_weights.items() if p.grad is None or not p.grad.abs().max() > 0]
    assert not unused, f"adapters without effect on the output: {unused}"
    # And the change is real: moving one B of a directly read layer moves the output.
    name = next(n for n in b_weights if "sampling_offsets" in n)
    with torch.no_grad():
        b_weights[name].normal_(0, 0.5)
    assert (raw_outputs(model, image) - base).abs().max() > 1e-4
    assert LORA_PARAMETERS == ("in_proj_weight",)


def test_merged_weights_give_the_adapter_outputs(tiny_model, image):
    model, tuner = adapted(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    with_adapters = raw_outputs(model, image)
    assert not torch.allclose(with_adapters, raw_outputs(tiny_model, image), atol=1e-3)
    merged = merge_lora(tuner)
    assert sorted(merged.state_dict()) == sorted(tiny_model.state_dict())
    assert torch.allclose(raw_outputs(merged, image), with_adapters, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_lora_run_saves_the_adapter_only_and_merges_into_plain_weights(
    tmp_path, tiny_model, image
):
    data = write_dataset(str(tmp_path / "data"), num_train=4, num_test=2)
    (tmp_path / "config.py").write_text(WAY1_CONFIG)
    base = str(tmp_path / "base.pth")
    torch.save({"model": tiny_model.state_dict()}, base)
    out = str(tmp_path / "out")
    rc, log = run_train_net(
        "--config-file",
        str(tmp_path / "config.py"),
        *dataset_overrides(data),
        f"train.output_dir={out}",
        *FAST,
        f"train.init_checkpoint={base}",
        "train.lora.rank=4",
        "optimizer.lr=1e-2",  # two steps that visibly move the adapter
    )
    assert rc == 0, log[-4000:]
    assert "LoRA rank 4 (alpha 16) on 62 weights" in log
    adapter = f"{out}/model_final.pth"
    data_final = load_checkpoint_file(adapter)
    keys = list(data_final["model"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert data_final["lora"]["base_checkpoint"] == base
    assert os.path.getsize(adapter) < os.path.getsize(base) / 10

    config = f"{out}/config.yaml"
    cfg = get_config(config)
    # The adapter is refused where plain weights are expected, with the way out.
    with pytest.raises(CheckpointMismatchError, match="merge-lora"):
        build_model(cfg, adapter, device="cpu")
    # Strict onto the base: an adapter with a key missing is refused, naming it.
    broken = dict(data_final, model=dict(data_final["model"]))
    missing = keys[0]
    del broken["model"][missing]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        load_lora_model(cfg, str(tmp_path / "broken.pth"))

    merged_path = str(tmp_path / "merged.pth")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"))
    command = [sys.executable, "-m", "grounding_dino.finetune", "merge-lora", config, adapter]
    result = subprocess.run(command + [merged_path], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain weights" in result.stdout
    again = subprocess.run(command + [merged_path], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr

    lora_model, _, _ = load_lora_model(cfg, adapter)
    expected = raw_outputs(lora_model.eval(), image)
    assert not torch.allclose(expected, raw_outputs(tiny_model, image), atol=1e-4)
    predictor_model = build_model(cfg, merged_path, device="cpu")  # the predictor's loader
    assert torch.allclose(raw_outputs(predictor_model, image), expected, atol=2e-5, rtol=1e-5)
    from grounding_dino.export.cli import load_model_for_export

    exported, _ = load_model_for_export(config, merged_path)  # the ONNX export's loader
    assert torch.allclose(raw_outputs(exported, image), expected, atol=2e-5, rtol=1e-5)
