"""``tools/benchmark.py``: runs end to end on a tiny configuration, and its output check can fail.

It is a benchmark, not a test of speed: nothing here asserts which implementation is faster.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.structures import Boxes, Instances

from grounding_dino.comparison import checks as check
from grounding_dino.comparison import reference

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
TINY_SIZE = "96x128"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny transformers model and its conversion, as ``--workdir`` keeps them."""
    folder = tmp_path_factory.mktemp("benchmark")
    reference.prepare_models(str(folder), tiny=True)
    return folder


def _run_tool(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(TOOLS / "benchmark.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_tiny_benchmark_prints_check_times_ratio_and_memory(workdir):
    run = _run_tool(
        "--tiny", "--runs", "2", "--threads", "1", "--size", TINY_SIZE, "--workdir", str(workdir)
    )
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    # The models of the fixture were reused, not built again.
    assert (workdir / "tiny").is_file() and (workdir / "converted" / "config.yaml").is_file()
    assert "Outputs equal" in out, out
    rows = {}
    for name in ("transformers", "ours"):
        row = re.search(rf"^{name}\s+(\d+\.\d+)\s+(\S+), (\S+)\s+(\d+)$", out, re.MULTILINE)
        assert row, out
        median, first, second, peak = row.groups()
        # The median of two runs is their mean (the table prints 2 and 3 decimals).
        assert float(median) == pytest.approx((float(first) + float(second)) / 2, abs=0.006)
        memory = re.search(rf"Memory {name}: peak RSS (\d+) MB \(after loading (\d+) MB\)", out)
        assert memory and int(memory.group(1)) == int(peak) >= int(memory.group(2)) > 100, out
        rows[name] = float(median)
    ratio = re.search(r"Speed-up of ours over transformers \(fp32\): (\S+)x", out)
    assert ratio, out
    assert float(ratio.group(1)) == pytest.approx(rows["transformers"] / rows["ours"], rel=0.1)
    assert "1 threads" in out and f"image {TINY_SIZE}" in out


def test_check_outputs_fails_when_the_models_differ(workdir):
    size = reference.parse_size(TINY_SIZE)
    image = reference.make_image(TINY_SIZE)
    hf = reference.load_hf(str(workdir / "hf"), size)
    ours = reference.load_ours(str(workdir / "converted"), size)
    caption = "a cat . a remote control ."
    thresholds = ours.model.box_threshold, ours.model.max_detections
    result = check.check_outputs(hf, ours, image, caption)
    assert result["queries_unmatched"] == 0 and result["topk_ranks_differ"] == 0
    # The check keeps every query for itself only.
    assert (ours.model.box_threshold, ours.model.max_detections) == thresholds
    # Noise of std 0.001 on the reference's text projection (its weights' std is about 0.03)
    # changes the text features and so the scores: the check fails. (A constant bias would
    # not do: the normalisations downstream remove it.)
    weight = hf.model.model.text_projection.weight
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight.add_(0.001 * noise)
    with pytest.raises(AssertionError, match="outputs differ"):
        check.check_outputs(hf, ours, image, caption)


def _output(boxes, scores):
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.tensor(scores)
    return {"instances": instances}


def test_drift_on_hand_made_detections():
    fp32 = _output([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.5])
    # IoU by hand: [0,0,10,9.5] in [0,0,10,10] is 95/100; [60,50,80,70] against
    # [50,50,70,70] overlaps 10x20 = 200 of 400 + 400 - 200 = 600, so 1/3.
    other = _output([[60, 50, 80, 70], [0, 0, 10, 9.5]], [0.4, 0.85])
    result = check.drift(fp32, other)
    assert result["detections_fp32"] == 2 and result["detections_other"] == 2
    assert result["matched_iou0.9"] == 0.5
    assert result["mean_iou"] == pytest.approx((0.95 + 1 / 3) / 2, abs=1e-4)
    assert result["max_score_diff"] == pytest.approx(0.05, abs=1e-5)
    assert check.drift(fp32, _output(torch.zeros(0, 4).tolist(), [])) == {
        "detections_fp32": 2,
        "detections_other": 0,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "800by1333"], "--size must be HEIGHTxWIDTH"),
        (["--size", "32x32"], "at least 64 pixels"),
        (["--runs", "0"], "--threads and --runs must be at least 1"),
    ],
)
def test_bad_options_get_a_clear_error(argv, message):
    run = _run_tool(*argv)
    assert run.returncode == 1 and message in run.stderr, run.stderr[-3000:]
