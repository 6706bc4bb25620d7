"""``tools/benchmark.py --backend onnxruntime``: exports, checks and times the ONNX Runtime row."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_times_onnxruntime_next_to_ours(tmp_path):
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--tiny", "--size", "96x128"]
    command += ["--runs", "1", "--threads", "1", "--backend", "onnxruntime", "--no-memory"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        command + ["--workdir", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert "'same_phrases': True" in out and "'same_classes': True" in out
    box_diff = float(re.search(r"'max_box_diff_px': ([0-9.e-]+)", out).group(1))
    assert box_diff < 0.05
    assert re.search(r"^onnxruntime\s+\d+\.\d+", out, re.M), out
    assert re.search(r"ONNX: .*model\.onnx \(\d+\.\d MiB, export \d+\.\d s\)", out), out
    assert (tmp_path / "model.onnx").is_file()
