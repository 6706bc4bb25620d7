"""The offline main job, run as a user runs it (``python tools/demo_job.py``, ``make demo``)."""

import contextlib
import glob
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
TINY = ["--max-iter", "2", "--num-train", "6", "--num-val", "3", "--num-draw", "1"]
TINY += ["--masks", "--mask-iter", "2"]  # the small SAM of the mask stage
# Smaller model and batch: the test checks the plumbing, not the accuracy.
OVERRIDES = ["dataloader.train.total_batch_size=2", "model.query_selector.num_queries=20"]


def _run_demo(out: str, overrides=OVERRIDES) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(TOOLS / "demo_job.py"), "--output", out, *TINY, *overrides]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def _read(path: str):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    run = _run_demo(out)
    return out, run.stdout, _read(os.path.join(out, "results.json"))


def _coco_ap(gt_file: str, results_json: str, max_dets: int = 300, iou_type="bbox") -> float:
    """COCO box (or mask) AP (percent) recomputed with pycocotools from the evaluator's dumped
    results."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        detections = _read(results_json)
        assert detections, f"{results_json} holds no detections"
        if iou_type == "segm":  # as detectron2: the mask's own area, not the box's
            detections = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        evaluation = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluation.params.maxDets = [1, 10, max_dets]
        evaluation.evaluate()
        evaluation.accumulate()
    # AP over IoU 0.5:0.95, all areas, the last maxDets (COCOeval.summarize reads 100 there).
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    valid = precision[precision > -1]
    return 100.0 * float(valid.mean()) if valid.size else -1.0


def test_first_run_trains_evaluates_and_draws(first_run):
    out, printed, results = first_run
    assert "[train] iter 2/2" in printed and " s/it " in printed and " ETA " in printed
    # The CPU's instruction sets, first (they decide the time: docs/benchmarks.md).
    assert printed.startswith("[cpu] ") and " avx2 " in printed.splitlines()[0]
    # The config's kind sampler: the job says how often detection and grounding records are
    # drawn, with the factors of the saved config.
    factors = dict(
        LazyConfig.load(os.path.join(out, "config.yaml")).dataloader.train.sampler.repeat_factors
    )
    assert "[data] training samples: detection " in printed and "grounding " in printed
    assert f"(repeat factors {factors}, dataloader.train.sampler)" in printed
    assert set(results) == {"bbox", "bbox_unseen", "rec", "segm"}
    # The mask stage: segm AP on shapes_val equals pycocotools' on the dumped masks, and the
    # small SAM landed as a transformers folder.
    (val_gt,) = glob.glob(os.path.join(out, "shapes", "val-*", "coco.json"))
    dumped = os.path.join(out, "inference", "shapes_val", "coco_segm_results.json")
    assert all("segmentation" in d for d in _read(dumped))
    expected = _coco_ap(val_gt, dumped, iou_type="segm")
    if results["segm"]["AP"] is None:
        assert expected < 0
    else:
        assert results["segm"]["AP"] == pytest.approx(expected, abs=1e-6)
    assert os.path.isfile(os.path.join(out, "sam", "model.safetensors"))
    assert "masks (small SAM on the boxes) shapes_val: segm AP" in printed
    # The detection APs equal pycocotools' on the evaluators' dumped detections and the
    # generated ground truth (at most 300 detections per image, as the evaluator).
    for key, dataset, split in (
        ("bbox", "shapes_val", "val"),
        ("bbox_unseen", "shapes_val_unseen", "val_unseen"),
    ):
        dumped = os.path.join(out, "inference", dataset, "coco_instances_results.json")
        (gt_file,) = glob.glob(os.path.join(out, "shapes", f"{split}-*", "coco.json"))
        expected = _coco_ap(gt_file, dumped)
        # The dumped detections use the dataset's category ids and lie inside the images.
        gt, detections = _read(gt_file), _read(dumped)
        sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
        assert {d["category_id"] for d in detections} <= {c["id"] for c in gt["categories"]}
        assert {d["image_id"] for d in detections} == set(sizes)
        for d in detections:
            x, y, w, h = d["bbox"]
            width, height = sizes[d["image_id"]]
            assert -1e-3 <= x <= x + w <= width + 1e-3 and -1e-3 <= y <= y + h <= height + 1e-3
            assert 0.0 <= d["score"] <= 1.0
        if results[key]["AP"] is None:  # no ground truth to score: COCOeval's -1
            assert expected < 0
        else:
            assert results[key]["AP"] == pytest.approx(expected, abs=1e-6)
    # REC: one record per generated expression of the val images; Acc@0.5 is the share of
    # top-1 boxes with IoU >= 0.5.
    (scenes,) = glob.glob(os.path.join(out, "shapes", "val-*", "scenes.json"))
    expressions = sum(len(scene["refs"]) for scene in _read(scenes)["images"])
    records = _read(os.path.join(out, "inference", "shapes_rec_val", "rec_predictions.json"))
    assert len(records) == expressions > 0
    top1 = np.mean([r["ious"][0] >= 0.5 if r["ious"] else False for r in records])
    assert results["rec"]["Acc@0.5"] == pytest.approx(100.0 * top1)

    # Trained through train_net.py's driver: the checkpoint holds the trainer state that
    # train_net.py --resume reads, beside the record of the config.
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert {"model", "trainer", "trained_config", "iteration"} <= set(saved)
    assert saved["trainer"]["iteration"] == 1 and "optimizer" in saved["trainer"]
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["det_0.png", "rec_0.png"]
    assert os.path.getsize(os.path.join(out, "det_0.png")) > 1000
    info = _read(os.path.join(out, "run_info.json"))
    assert info["iterations"] == 2 and info["reused_checkpoint"] is False
    # The job picks its parallelism from the usable cores and says what it picked; with two
    # or more cores the batch of 2 is trained by two data-parallel (gloo) processes.
    workers = min(2, len(os.sched_getaffinity(0)))
    assert info["workers"] == workers and info["cores"] == len(os.sched_getaffinity(0))
    assert f"{workers} data-parallel process(es) x {info['threads']} thread(s)" in printed
    assert os.path.samefile(info["config_file"], REPO / "configs" / "shapes_tiny.py")
    # The saved config reloads (it stayed serialisable), with the command line's overrides.
    cfg = LazyConfig.load(os.path.join(out, "config.yaml"))
    assert os.path.isdir(cfg.model.text_encoder.name_or_path)
    assert cfg.model.query_selector.num_queries == 20 and cfg.train.max_iter == 2
    # Everything the job wrote stays under its output folder.
    assert len(glob.glob(os.path.join(out, "shapes", "train-*", "images", "*.png"))) == 6


def test_second_run_reuses_the_checkpoint_and_gives_the_same_results(first_run):
    out, _, first_results = first_run
    checkpoint = os.path.join(out, "model_final.pth")
    mtime = os.path.getmtime(checkpoint)
    printed = _run_demo(out).stdout
    assert "reusing the trained model" in printed
    assert "[train] iter" not in printed
    assert os.path.getmtime(checkpoint) == mtime
    # Evaluating the same model again gives the same numbers (evaluation is deterministic).
    assert _read(os.path.join(out, "results.json")) == first_results
    assert _read(os.path.join(out, "run_info.json"))["iterations"] == 2


def test_changed_override_trains_again_and_says_why(first_run):
    # Runs after the reuse test: it replaces the first run's model.
    out, _, _ = first_run
    checkpoint = os.path.join(out, "model_final.pth")
    mtime = os.path.getmtime(checkpoint)
    changed = [OVERRIDES[0], "model.query_selector.num_queries=21"]
    printed = _run_demo(out, changed).stdout
    assert (
        f"[train] training: {checkpoint} was trained with a different config (1 value(s) "
        "differ, trained -> now: model.query_selector.num_queries: 20 -> 21). The new run "
        "replaces the old run's model_final.pth, config.yaml, metrics.json, run_info.json"
    ) in printed
    assert "[train] iter 2/2" in printed and "reusing the trained model" not in printed
    # The model and its config.yaml were published together when training ended, with a notice.
    (notice,) = [line for line in printed.splitlines() if "replaced the earlier run's" in line]
    assert "config.yaml" in notice and "model_final.pth" in notice and out in notice
    assert not os.path.exists(os.path.join(out, ".training"))
    assert os.path.getmtime(checkpoint) > mtime
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["trained_config"]["model.query_selector.num_queries"] == 21
    assert LazyConfig.load(os.path.join(out, "config.yaml")).model.query_selector.num_queries == 21
    # metrics.json holds the new run's log only (detectron2's JSONWriter appends).
    with open(os.path.join(out, "metrics.json")) as f:
        assert [json.loads(line)["iteration"] for line in f if "total_loss" in line] == [1]
    # The same command again reuses the new model.
    again = _run_demo(out, changed).stdout
    assert "reusing the trained model" in again and "[train] iter" not in again


@pytest.fixture(scope="module")
def demo_job():
    """The job's library (``tools/demo_job.py`` is its command line)."""
    from grounding_dino import shapes_demo

    return shapes_demo


def test_bad_arguments_are_refused(demo_job):
    with pytest.raises(SystemExit, match="--max-iter"):
        demo_job.parse_args(["--max-iter", "0"])
    with pytest.raises(SystemExit, match="--threads"):
        demo_job.parse_args(["--threads", "0"])
    with pytest.raises(SystemExit, match="--workers"):
        demo_job.parse_args(["--workers", "0"])


def test_mask_stage_is_on_by_default_and_can_be_turned_off(demo_job):
    # make demo shows Grounded-SAM masks unless the user asks for boxes only.
    assert demo_job.parse_args([]).masks is True
    assert demo_job.parse_args(["--no-masks"]).masks is False
    assert demo_job.parse_args(["--masks"]).masks is True


def test_parallelism_defaults_use_every_core(demo_job):
    plan = demo_job.plan_parallelism
    # One data-parallel process per core, as many as divide the batch; leftover cores as threads.
    assert plan(4, None, None, cores=2) == (2, 1)
    assert plan(4, None, None, cores=8) == (4, 2)
    assert plan(6, None, None, cores=4) == (3, 1)
    assert plan(4, None, None, cores=1) == (1, 1)
    assert plan(4, 1, None, cores=2) == (1, 2)
    assert plan(4, 2, 3, cores=2) == (2, 3)
    with pytest.raises(SystemExit, match="--workers 3 does not divide the batch size 4"):
        plan(4, 3, None, cores=8)


def test_config_record_is_resolved_and_flat(demo_job):
    args = demo_job.parse_args(["--output", "/tmp/x", "--max-iter", "7", *OVERRIDES])
    cfg, _ = demo_job.load_config(args)
    record = demo_job.config_record(cfg)
    assert record["model.query_selector.num_queries"] == 20 and record["train.max_iter"] == 7
    # The job's options reach train_net's driver as config values; it evaluates after training.
    assert record["train.log_period"] == 25 and record["train.checkpointer.period"] == 0
    assert record["train.eval_period"] == -1
    # Interpolations are resolved: the mapper's token limit is the model's.
    assert record["dataloader.train.mapper.max_text_len"] == record["model.max_text_len"] == 256
    assert record["dataloader.train.mapper.augmentations.0.prob"] == 0.5
    assert all(not isinstance(v, (dict, list)) or not v for v in record.values())


def test_reuse_decision(demo_job, tmp_path):
    record = {"a": 1, "b.0": "x", "train.output_dir": "here"}
    assert demo_job.reuse_decision(str(tmp_path), record, retrain=False) == (
        False,
        f"[train] training: no trained model in {tmp_path}.",
    )
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": {}}, checkpoint)
    reuse, message = demo_job.reuse_decision(str(tmp_path), record, retrain=False)
    assert not reuse and "holds no record of the config it was trained with" in message
    assert "replaces the old run's model_final.pth in" in message

    torch.save(
        {"model": {}, "trained_config": dict(record, **{"train.output_dir": "there"})}, checkpoint
    )
    reuse, message = demo_job.reuse_decision(str(tmp_path), record, retrain=False)
    assert reuse and "reusing the trained model" in message  # the output folder does not count
    # Nor do the log, checkpoint and evaluation periods.
    periods = {"train.log_period": 5, "train.checkpointer.period": 0, "train.eval_period": -1}
    reuse, _ = demo_job.reuse_decision(str(tmp_path), dict(record, **periods), retrain=False)
    assert reuse
    reuse, message = demo_job.reuse_decision(str(tmp_path), record, retrain=True)
    assert not reuse and message.startswith("[train] training: --retrain.")

    changed = {"a": 2, "c": 3, **{f"k{i}": i for i in range(6)}, "train.output_dir": "here"}
    reuse, message = demo_job.reuse_decision(str(tmp_path), changed, retrain=False)
    assert not reuse
    assert (
        "(9 value(s) differ, trained -> now: a: 1 -> 2; b.0: 'x' -> (absent); c: (absent) -> 3; "
        "k0: (absent) -> 0; k1: (absent) -> 1; and 4 more)"
    ) in message


def test_cpu_line_names_the_instruction_sets(monkeypatch):
    from grounding_dino import precision

    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "avx", "avx2", "fma"})
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "AMD EPYC 7B13")
    precision.cpu_has_native_bf16.cache_clear()
    try:
        line = precision.describe_cpu()
        monkeypatch.setattr(precision, "_cpu_flags", lambda: set())
        precision.cpu_has_native_bf16.cache_clear()
        unknown = precision.describe_cpu()
    finally:
        precision.cpu_has_native_bf16.cache_clear()  # later tests see the real CPU
    assert line.startswith("AMD EPYC 7B13: avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 no;")
    assert line.endswith("bfloat16 emulated")
    assert "instruction sets unknown" in unknown


def test_default_config_is_the_packaged_shapes_tiny(demo_job):
    args = demo_job.parse_args([])
    assert args.config_file is None and args.output == os.path.join("output", "demo")
    assert os.path.samefile(demo_job.default_config_file(), REPO / "configs" / "shapes_tiny.py")


def test_interrupted_retrain_keeps_the_old_model_with_its_config(
    first_run, demo_job, tmp_path, monkeypatch
):
    """Training is interrupted (Ctrl-C, kill) after the new config is known: the output folder
    keeps the old model with its own config.yaml; a rerun starts the training afresh."""
    out = str(tmp_path / "out")
    shutil.copytree(first_run[0], out)
    before = {n: Path(out, n).read_bytes() for n in ("model_final.pth", "config.yaml")}

    def interrupted(*args, **kwargs):
        assert os.path.isdir(os.path.join(out, ".training"))  # training writes only there
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_job.job, "train_model", interrupted)
    monkeypatch.setattr(demo_job.job, "train_in_processes", interrupted)
    changed = [OVERRIDES[0], "model.query_selector.num_queries=23"]
    args = demo_job.parse_args(["--output", out, *TINY, "--workers", "1", *changed])
    with pytest.raises(KeyboardInterrupt):
        demo_job.run_demo(args)
    assert {n: Path(out, n).read_bytes() for n in before} == before


def test_demo_mask_stage_runs_on_one_thread_and_restores_the_callers():
    from grounding_dino.shapes_demo.masks import TimedStage

    seen = []

    def stage(image, boxes):
        seen.append(torch.get_num_threads())
        return "masks"

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timed = TimedStage(stage)
        assert timed(None, None) == "masks" and seen == [1]
        assert torch.get_num_threads() == 2
        assert timed.timing()["mask_stage_seconds"] >= 0.0
    finally:
        torch.set_num_threads(previous)
