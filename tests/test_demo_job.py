"""Smoke test of the offline main job (``python -m grounding_dino.demo_job``, ``make demo``)."""

import json
import os

import pytest
from detectron2.config import LazyConfig

from grounding_dino import demo_job

TINY = ["--max-iter", "2", "--num-train", "6", "--num-val", "3", "--num-draw", "1"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    # Smaller model and batch: the test checks the plumbing, not the accuracy.
    overrides = ["dataloader.train.total_batch_size=2", "model.query_selector.num_queries=20"]
    results = demo_job.main(["--output", out, *TINY, *overrides])
    return out, overrides, results


def test_first_run_trains_evaluates_and_draws(first_run, capsys):
    out, _, results = first_run
    with open(os.path.join(out, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == results
    assert set(on_disk) == {"bbox", "bbox_unseen", "rec"}
    for key in ("AP", "AP50"):
        for task in ("bbox", "bbox_unseen"):
            assert on_disk[task][key] is None or 0.0 <= on_disk[task][key] <= 100.0
    assert 0.0 <= on_disk["rec"]["Acc@0.5"] <= 100.0
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["det_0.png", "rec_0.png"]
    assert os.path.getsize(os.path.join(out, "det_0.png")) > 1000
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["iterations"] == 2 and info["reused_checkpoint"] is False
    # The saved config reloads (it stayed serialisable) and names the MiniLM folder.
    cfg = LazyConfig.load(os.path.join(out, "config.yaml"))
    assert os.path.isdir(cfg.model.text_encoder.name_or_path)
    assert cfg.model.query_selector.num_queries == 20
    # Everything the job wrote stays under its output folder.
    assert os.path.isdir(os.path.join(out, "shapes"))


def test_second_run_reuses_the_checkpoint(first_run, capsys):
    out, overrides, _ = first_run
    checkpoint = os.path.join(out, "model_final.pth")
    mtime = os.path.getmtime(checkpoint)
    capsys.readouterr()
    results = demo_job.main(["--output", out, *TINY, *overrides])
    printed = capsys.readouterr().out
    assert "reusing the trained model" in printed
    assert "[train] iter" not in printed
    assert os.path.getmtime(checkpoint) == mtime
    assert set(results) == {"bbox", "bbox_unseen", "rec"}
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["iterations"] == 2


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--max-iter"):
        demo_job.parse_args(["--max-iter", "0"])
    with pytest.raises(SystemExit, match="--threads"):
        demo_job.parse_args(["--threads", "0"])
