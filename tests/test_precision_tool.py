"""``tools/evaluate_precision.py`` run as a user runs it, on a model ``tools/demo_job.py``
trained for two iterations: per-mode metrics from the project's evaluators (fp32 equal to the
demo job's own evaluation), ``--max-images``, refused modes, and the loss labels."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
TINY = ["--max-iter", "2", "--num-train", "6", "--num-val", "3", "--num-draw", "1", "--no-masks"]
OVERRIDES = ["dataloader.train.total_batch_size=2", "model.query_selector.num_queries=20"]


def _run(*command):
    return subprocess.run(
        [sys.executable, *map(str, command)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision_tool") / "demo"
    done = _run(TOOLS / "demo_job.py", "--output", out, *TINY, *OVERRIDES)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_modes_are_evaluated_with_the_demo_jobs_evaluators(trained):
    output = trained / "precision.json"
    done = _run(TOOLS / "evaluate_precision.py", "--weights", trained / "model_final.pth")
    assert done.returncode == 0, done.stderr[-3000:]
    results = _read(output)
    assert list(results["modes"]) == ["fp32", "bf16"]  # the CPU's modes, fp32 first
    # Images for detection; for REC, one record per expression (2 per image here).
    assert results["images"]["shapes_val"] == 3 and results["images"]["shapes_rec_val"] >= 3
    # fp32 is the demo job's own evaluation of the same model and images.
    demo = _read(trained / "results.json")
    fp32 = results["modes"]["fp32"]
    assert fp32["shapes_val"]["AP"] == pytest.approx(demo["bbox"]["AP"], abs=1e-9)
    assert fp32["shapes_val"]["AP50"] == pytest.approx(demo["bbox"]["AP50"], abs=1e-9)
    assert fp32["shapes_rec_val"]["Acc@0.5"] == pytest.approx(demo["rec"]["Acc@0.5"], abs=1e-9)
    for mode in ("fp32", "bf16"):
        assert results["modes"][mode]["shapes_val"]["seconds"] > 0
    # bf16 ran in bf16: its detections (the evaluator's dump, per mode) are of the same images,
    # 300 each, but not fp32's (fp32 on the CPU repeats itself exactly, as the AP check above
    # shows); that they equal fp32's up to bf16 rounding is test_precision.py's check.
    dumped = {
        mode: _read(trained / "precision" / mode / "shapes_val" / "coco_instances_results.json")
        for mode in ("fp32", "bf16")
    }
    for mode, detections in dumped.items():
        per_image = collections.Counter(d["image_id"] for d in detections)
        assert len(per_image) == 3 and set(per_image.values()) == {300}, mode
    key = lambda d: (d["image_id"], d["category_id"], d["score"])  # noqa: E731
    same = sorted(map(key, dumped["bf16"])) == sorted(map(key, dumped["fp32"]))
    assert not same, "bf16 gave exactly fp32's detections: it did not run in bf16"
    # The table printed is the one written.
    assert results["table"] in done.stdout and f"Wrote {output}" in done.stdout


def test_max_images_and_refused_modes(trained, tmp_path):
    output = tmp_path / "few.json"
    done = _run(
        TOOLS / "evaluate_precision.py",
        "--weights",
        trained / "model_final.pth",
        "--modes",
        "bf16",
        "--datasets",
        "shapes_val",
        "--max-images",
        "2",
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = _read(output)
    assert results["images"] == {"shapes_val": 2} and list(results["modes"]) == ["bf16"]
    again = _run(
        TOOLS / "evaluate_precision.py",
        "--weights",
        trained / "model_final.pth",
        "--output",
        output,
    )
    assert again.returncode == 1 and f"--output: {output} exists" in again.stderr
    assert "pass --force" in again.stderr and _read(output) == results  # untouched
    refused = _run(
        TOOLS / "evaluate_precision.py",
        "--weights",
        trained / "model_final.pth",
        "--modes",
        "fp32,fp16",
    )
    assert refused.returncode == 2 and "dtype='fp16' is not offered on the CPU" in refused.stderr


@pytest.fixture(scope="module")
def tool():
    """The tool's table and labels (``grounding_dino.evaluation.precision_modes``)."""
    from grounding_dino.evaluation import precision_modes

    return precision_modes


def test_modes_losing_more_than_the_limit_are_labelled(tool):
    results = {
        "modes": {
            "fp32": {
                "val": {"AP": 40.0, "AP50": 60.0, "seconds": 10.0},
                "rec": {"Acc@0.5": 70.0, "seconds": 5.0},
            },
            "bf16": {
                "val": {"AP": 39.5, "AP50": 58.0, "seconds": 6.0},
                "rec": {"Acc@0.5": 68.5, "seconds": 3.0},
            },
            "fp16": {
                "val": {"AP": 38.9, "AP50": 60.0, "seconds": 5.0},
                "rec": {"Acc@0.5": 70.0, "seconds": 2.0},
            },
        }
    }
    losses = tool.label_losses(results, max_loss=1.0)
    # AP50 is not judged; REC accuracy is, in points.
    assert losses == {"fp32": [], "bf16": ["rec Acc@0.5 -1.50"], "fp16": ["val AP -1.10"]}
    table = tool.markdown_table(results, losses, 1.0).splitlines()
    assert table[0] == "| mode | val AP | val AP50 | val s | rec Acc@0.5 | rec s | note |"
    assert table[2] == "| fp32 | 40.00 | 60.00 | 10.0 | 70.00 | 5.0 | reference |"
    assert table[4] == (
        "| fp16 | 38.90 (-1.10) | 60.00 (+0.00) | 5.0 | 70.00 (+0.00) | 2.0 "
        "| LOSES > 1: val AP -1.10 |"
    )
