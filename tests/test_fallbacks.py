"""
Fallbacks that change what a user gets are errors unless asked for (issue 32, items 7 and 9):
CUDA asked for without CUDA ("auto" is the way to ask for either), emulated bf16 on a CPU
without native bfloat16 (``allow_emulated_bf16`` / ``GROUNDING_DINO_ALLOW_EMULATED_BF16=1``),
the yacs bridge's warning for an empty ``MODEL.WEIGHTS``, and the demo job's publication of a
trained model with its ``config.yaml``.
"""

import argparse
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from grounding_dino import GroundingDINOPredictor, add_grounding_dino_config, precision
from grounding_dino.model_zoo import (
    add_model_arguments,
    get_config,
    get_config_file,
    load_config,
    resolve_device,
)
from grounding_dino.shapes_demo import staging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# environment.md: how an AVX-512 machine approximates an AVX2-only one
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


# ---------------------------------------------------------------------------- the device
@no_cuda
def test_cuda_without_cuda_is_an_error_and_auto_picks_the_cpu():
    with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available here"):
        resolve_device("cuda")
    cfg = get_config("shapes_tiny.py", ["train.device=cuda:0"])
    with pytest.raises(ValueError, match="the config's train.device is 'cuda:0'.*'auto'"):
        resolve_device(None, cfg)
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None, get_config("shapes_tiny.py", ["train.device=auto"])) == "cpu"
    # The predictor refuses before building anything (the weights are not even opened).
    with pytest.raises(ValueError, match="CUDA is not available"):
        GroundingDINOPredictor(cfg, weights="never-read.pth", device="cuda")


def test_inference_configs_do_not_pin_the_cpu():
    # The configs a converted checkpoint's config.yaml starts from ask for CUDA when available.
    for name in ("grounding_dino_swin_t_ogc.py", "grounding_dino_swin_b_cogcoor.py"):
        assert get_config(name).train.device == "auto", name
    # A thin yacs config without MODEL.DEVICE leaves the device to the lazy config
    # (detectron2's default "cuda" is not a choice of the user's).
    yaml_file = os.path.join(REPO, "configs", "grounding_dino_swin_t_ogc.yaml")
    assert load_config(yaml_file).device is None
    assert load_config(yaml_file, ["MODEL.DEVICE=cpu"]).device == "cpu"


def test_empty_model_weights_warns_that_predictions_come_from_random_weights(caplog):
    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = get_config_file("shapes_tiny.py")
    cfg.MODEL.GROUNDING_DINO.PROMPT = "red square ."
    cfg.MODEL.DEVICE = "cpu"
    with caplog.at_level(logging.WARNING, logger="grounding_dino.config"):
        build_model(cfg)  # detectron2's convention: a warning, the model is built
    assert "MODEL.WEIGHTS is empty" in caplog.text
    assert "predictions (DefaultPredictor's included) come from random weights" in caplog.text


# ------------------------------------------------------------------------------- bf16
def _native_bf16(monkeypatch, capability, onednn_isa):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    precision.cpu_has_native_bf16.cache_clear()
    try:
        return precision.cpu_has_native_bf16()
    finally:
        precision.cpu_has_native_bf16.cache_clear()


def test_native_bf16_detection_follows_the_cpu_and_the_isa_limits(monkeypatch):
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    has_flag = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert _native_bf16(monkeypatch, "AVX512", None) == has_flag
    assert _native_bf16(monkeypatch, "AVX512", "AVX512_CORE_BF16") == has_flag
    # An AVX-512 machine held to AVX2 (torch's kernels or oneDNN's) computes bf16 by emulation.
    assert _native_bf16(monkeypatch, "AVX2", None) is False
    assert _native_bf16(monkeypatch, "AVX512", "AVX2") is False
    # ... and ATEN_CPU_CAPABILITY=avx2 is what torch then reports (what the detection reads).
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = dict(os.environ, **AVX2_ONLY)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "AVX2", run.stderr[-2000:]


def test_predictor_refuses_emulated_bf16_unless_asked(monkeypatch, tmp_path, tiny_model):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv(precision.ALLOW_EMULATED_BF16_ENV, raising=False)
    cfg = get_config("shapes_tiny.py")
    weights = tmp_path / "model.pth"
    torch.save({"model": tiny_model.state_dict()}, weights)
    with pytest.raises(ValueError, match="tens of times slower than fp32"):
        GroundingDINOPredictor(cfg, weights=str(weights), dtype="bf16", device="cpu")
    predictor = GroundingDINOPredictor(
        cfg, weights=str(weights), dtype="bf16", device="cpu", allow_emulated_bf16=True
    )
    assert predictor.dtype == "bf16"


def test_evaluate_precision_on_an_avx2_only_cpu(tmp_path):
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")  # parse_args only checks that the file exists
    env = {k: v for k, v in os.environ.items() if k != precision.ALLOW_EMULATED_BF16_ENV}
    env.update(AVX2_ONLY)
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "evaluate_precision.py"),
        "--weights",
        str(weights),
        "--modes",
        "fp32,bf16",
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--modes: dtype='bf16' on this CPU would be emulated" in run.stderr
    assert "--allow-emulated-bf16" in run.stderr or "allow_emulated_bf16=True" in run.stderr


def test_demo_cli_refuses_emulated_bf16(tmp_path, tiny_model):
    weights = tmp_path / "model.pth"
    torch.save({"model": tiny_model.state_dict()}, weights)
    image = str(tmp_path / "image.png")
    cv2.imwrite(image, np.full((64, 64, 3), 200, np.uint8))
    env = {k: v for k, v in os.environ.items() if k != precision.ALLOW_EMULATED_BF16_ENV}
    env.update(AVX2_ONLY)
    command = [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--dtype", "bf16"]
    command += ["--config-file", get_config_file("shapes_tiny.py"), "--weights", str(weights)]
    command += ["--prompt", "red square", "--input", image, "--json", str(tmp_path / "o.json")]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "dtype='bf16' on this CPU would be emulated" in run.stderr
    assert "tens of times slower than fp32" in run.stderr
    assert not os.path.exists(tmp_path / "o.json")


def test_allow_emulated_bf16_flag_of_every_dtype_command(monkeypatch):
    monkeypatch.delenv(precision.ALLOW_EMULATED_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)  # demo.py, web.py and the labeller's --dtype
    args = parser.parse_args(["--config-file", "c.py", "--dtype", "bf16"])
    assert args.allow_emulated_bf16 is False
    with pytest.raises(ValueError, match="would be emulated"):
        precision.check_precision(args.dtype, "cpu")
    args = parser.parse_args(["--config-file", "c.py", "--dtype", "bf16", "--allow-emulated-bf16"])
    # The flag is the environment variable, which reaches the commands' worker processes.
    assert args.allow_emulated_bf16 is True
    assert os.environ[precision.ALLOW_EMULATED_BF16_ENV] == "1"
    assert precision.check_precision(args.dtype, "cpu") == "bf16"


# ------------------------------------------------------------------ the demo job's files
def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("interrupt_at", [0, 1, 2, 3, None])
def test_publish_never_pairs_a_model_with_another_runs_config(tmp_path, monkeypatch, interrupt_at):
    out = tmp_path / "out"
    os.makedirs(out)
    for name in ("model_final.pth", "config.yaml", "metrics.json"):
        _write(out / name, f"old {name}")
    stage = staging.start_staging(str(out))
    for name in ("model_final.pth", "config.yaml", "metrics.json", "last_checkpoint"):
        _write(os.path.join(stage, name), f"new {name}")
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        calls.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", replace)
    try:
        replaced = staging.publish_run(stage, str(out))
    except KeyboardInterrupt:
        replaced = None
    model, config = _read(out / "model_final.pth"), _read(out / "config.yaml")
    # At every instant: the old pair, a model without a config, or the new pair.
    assert (model, config) in {
        ("old model_final.pth", "old config.yaml"),
        ("old model_final.pth", None),
        ("new model_final.pth", None),
        ("new model_final.pth", "new config.yaml"),
    }
    if interrupt_at is None:
        assert config == "new config.yaml" and calls[-1] == "config.yaml"
        assert replaced == ["config.yaml", "metrics.json", "model_final.pth"]
        assert not os.path.exists(stage)
