"""``tools/benchmark.py``: runs end to end on a tiny configuration, and its output check can fail.

It is a benchmark, not a test of speed: nothing here asserts which implementation is faster.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.structures import Boxes, Instances
from torch.utils._python_dispatch import TorchDispatchMode

from grounding_dino.comparison import checks as check
from grounding_dino.comparison import reference, training, training_run

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
        (["--train", "--rows-apart", "--no-memory"], "cannot be combined with --no-memory"),
        (["--rows-apart"], "it needs --train"),
    ],
)
def test_bad_options_get_a_clear_error(argv, message):
    run = _run_tool(*argv)
    assert run.returncode == 1 and message in run.stderr, run.stderr[-3000:]


def test_train_benchmark_prints_steps_speed_up_and_memory_of_each_row(workdir):
    """``--train`` on the tiny model: every row's steps, its median (the steps after the first)
    and its peak memory from a child process, with the ratios against transformers, and the
    step's counted matrix work with its rate."""
    rows = [
        "transformers", "ours (dn on)", "ours (dn off)", "ours (dn off + checkpointing with Swin)"
    ]  # fmt: skip
    run = _run_tool(
        "--train", "--tiny", "--size", "64x96", "--steps", "2", "--threads", "1",
        "--rows", ",".join(rows), "--workdir", str(workdir),
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "batch 1 of 64x96, 2 steps per row" in out and "1 threads" in out, out
    # Every row runs under train_net.py's CPU malloc settings unless --glibc-defaults.
    assert "malloc: train_net.py's CPU settings" in out and "MALLOC_TOP_PAD_=" in out, out
    found = {}
    for name in rows:
        pattern = (
            rf"^{re.escape(name)}\s+(\d+\.\d+)\s+(\d+\.\d+), (\d+\.\d+)\s+(\d+)\s+(\d+)"
            rf"\s+(\d+)\s+(\d+\.\d+)x\s+(\d+\.\d+)x\s+(\d+\.\d+)x\s+(\d+\.\d+)"
            rf"\s+(\d+\.\d+)x\s+(\d[\d.e+-]*)\s+(\d[\d.e+-]*)$"
        )
        row = re.search(pattern, out, re.MULTILINE)
        assert row, out
        values = list(map(float, row.groups()))
        median, _, second, peak, allocated, loaded, speed_up, memory, allocated_ratio = values[:9]
        cpu, gflop, rate = values[9], values[11], values[12]
        assert cpu > 0 and gflop > 0
        # GFLOP / the unrounded median; both printed to 3 significant digits, the median to 2
        # decimals.
        low = gflop * 0.99 / (median + 0.005)
        assert low <= rate <= gflop * 1.01 / max(median - 0.005, 1e-9), (rate, gflop, median)
        # The median leaves the first step out: with two steps it is the second.
        assert median == pytest.approx(second, abs=0.006)
        assert peak >= loaded > 100, out
        # The weights and the optimizer's state at least; no more than is resident.
        assert 0 < allocated <= peak, out
        found[name] = (median, peak, speed_up, memory, allocated, allocated_ratio, gflop)
    # Checkpointing computes the enhancer's, decoder's and Swin's forward again in the backward:
    # the counter sees that work.
    checkpointed = found["ours (dn off + checkpointing with Swin)"][6]
    assert checkpointed > 1.2 * found["ours (dn off)"][6], out
    hf, ours = found["transformers"], found["ours (dn on)"]
    assert hf[2] == 1.0 and hf[3] == 1.0 and hf[5] == 1.0
    assert ours[5] == pytest.approx(ours[4] / hf[4], abs=0.006)
    # The speed-up comes from the unrounded medians; the printed medians have 2 decimals, so
    # it must lie within what their rounding allows (plus its own rounding).
    low = (hf[0] - 0.005) / (ours[0] + 0.005) - 0.005
    high = (hf[0] + 0.005) / max(ours[0] - 0.005, 1e-9) + 0.005
    assert low <= ours[2] <= high, (ours[2], hf[0], ours[0])
    assert ours[3] == pytest.approx(ours[1] / hf[1], abs=0.006)


def test_train_benchmark_times_rows_apart_in_their_own_processes(workdir):
    """``--rows-apart``: each row's steps come from its own process, run one after the other
    (announced as they go), and the table says so."""
    rows = ["transformers", "ours (dn off)"]
    run = _run_tool(
        "--train", "--tiny", "--size", "64x96", "--steps", "3", "--threads", "1",
        "--rows", ",".join(rows), "--workdir", str(workdir), "--rows-apart",
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 steps per row (each row alone in its own process, then one step for its" in out
    assert "step 1/" not in out  # no alternating timing in the parent
    for index, name in enumerate(rows):
        assert f"row {index + 1}/2 {name}: its own process" in out, out
        announcement = rf"row {index + 1}/2 {re.escape(name)}: steps (.+) "
        announced = re.search(announcement + r"\(then (\d+\.\d+) s for the memory step", out, re.M)
        assert announced, out
        steps = [float(value.rstrip(" s")) for value in announced.group(1).split(", ")]
        assert len(steps) == 3 and float(announced.group(2)) > 0  # timed, then the sampled one
        pattern = rf"^{re.escape(name)}\s+(\d+\.\d+)\s+([\d., ]+?)\s+(\d+)\s+(\d+)\s+(\d+)\s"
        row = re.search(pattern, out, re.MULTILINE)
        assert row, out
        assert [float(v) for v in row.group(2).split(", ")] == pytest.approx(steps, abs=0.006)
        assert float(row.group(1)) == pytest.approx(
            sorted(steps[1:])[0] / 2 + sorted(steps[1:])[1] / 2, abs=0.006
        )
        assert 0 < int(row.group(4)) <= int(row.group(3)), out


def test_train_report_warns_of_rows_whose_steps_were_still_getting_faster():
    """A row whose last step is well under its median gets a warning naming it; a steady row
    (and a row of two steps, whose median is its last) does not."""
    times = {
        "transformers": [45.3, 44.5, 35.0],  # still falling: median 39.75, last 12% under
        "ours (dn off)": [19.3, 17.9, 18.0],
        "ours (dn on)": [20.0, 17.0],
    }
    result = {
        "times": times,
        "medians": {row: training_run._median_after_first(values) for row, values in times.items()},
        "cpu_times": times,
        "cpu_medians": {row: 1.0 for row in times},
        "load_average": ["1.00", "2.00"],
    }
    report = training_run.format_training_report(result, "header")
    warnings = [line for line in report.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, report
    assert "transformers: the last step (35.00 s) is 12% under the median" in warnings[0]
    assert "more --steps" in warnings[0]


class _ProductDtypes(TorchDispatchMode):
    """Records the dtypes of the matrix products' outputs run inside it."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.dtypes.add(out.dtype)
        return out


def test_train_steps_run_their_forward_in_the_precision_asked(workdir):
    """``precision="bf16"`` (``--train --dtype bf16``) puts both models' products in bfloat16;
    with "fp32" every product is fp32. Either way the step's loss is finite."""
    hf_dir, out_dir = reference.prepare_models(str(workdir), tiny=True)
    batch = training.make_training_batch((64, 96), 1)
    rows = ["transformers", "ours (dn off)"]
    for precision in ("fp32", "bf16"):
        steps = training.build_training_steps(rows, hf_dir, out_dir, batch, precision=precision)
        for row, step in steps.items():
            with _ProductDtypes() as seen:
                loss = step()
            assert math.isfinite(loss), (row, precision)
            if precision == "fp32":
                assert seen.dtypes == {torch.float32}, (row, seen.dtypes)
            else:
                assert torch.bfloat16 in seen.dtypes, (row, seen.dtypes)


def test_train_benchmark_says_when_its_rows_run_in_bf16(workdir):
    """``--train --dtype bf16``: the rows run (in their own processes too) and the table's
    header says which precision they ran in."""
    run = _run_tool(
        "--train", "--tiny", "--size", "64x96", "--steps", "2", "--threads", "1",
        "--rows", "ours (dn off)", "--workdir", str(workdir), "--rows-apart", "--dtype", "bf16",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "forward and loss in bf16 autocast (as train.amp on the CPU)" in run.stdout, run.stdout
    assert re.search(r"^ours \(dn off\)\s+\d+\.\d+", run.stdout, re.MULTILINE), run.stdout


def test_glibc_defaults_leave_malloc_alone():
    assert training.use_allocator(glibc_defaults=True) == "malloc: glibc defaults"


def test_train_benchmark_refuses_unknown_rows():
    run = _run_tool("--train", "--rows", "transformers,ours (dn maybe)")
    assert run.returncode == 1 and "unknown rows ['ours (dn maybe)']" in run.stderr, run.stderr


def test_gpu_memory_check_runs_on_the_cpu_with_the_tiny_model(workdir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(TOOLS / "gpu_memory_check.py"), "--tiny", "--size", "64x96"]
    command += ["--batches", "1,2", "--steps", "1", "--threads", "1", "--device", "cpu"]
    command += ["--checkpointing"]  # the enhancer, decoder and Swin layers
    command += ["--workdir", str(workdir), "--json", str(tmp_path / "memory.json")]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No GPU: the peak is the process's resident set size" in run.stdout
    for batch in (1, 2):
        assert re.search(rf"batch +{batch}: peak \d+\.\d+ GiB \(peak_rss_mb\)", run.stdout)
    assert "Largest batch that ran: 2" in run.stdout
    results = json.loads((tmp_path / "memory.json").read_text())["results"]
    assert [r["batch"] for r in results] == [1, 2]
    assert results[1]["peak_rss_mb"] >= results[0]["peak_rss_mb"] > 100
    # The results file is never overwritten.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "exists; it is not overwritten" in again.stderr


def test_checkpointing_rows_switch_the_outermost_modules_of_their_parts():
    """The Swin body is checkpointed whole: its stages' own switches stay off (checkpointing
    them too would recompute twice)."""
    from torch import nn

    from grounding_dino.comparison.training import _set_checkpointing

    def switch(*children):
        module = nn.Sequential(*children)
        module.use_checkpoint = False
        return module

    stage = switch()
    model = nn.Module()
    model.enhancer, model.decoder = switch(), switch()
    model.backbone = nn.Sequential(switch(stage))
    _set_checkpointing(model, ("enhancer", "backbone"))
    assert model.enhancer.use_checkpoint and model.backbone[0].use_checkpoint
    assert not model.decoder.use_checkpoint and not stage.use_checkpoint
    _set_checkpointing(model, ())
    assert not model.enhancer.use_checkpoint and not model.backbone[0].use_checkpoint
    _set_checkpointing(model, ("decoder",), swin_stages=(0, 1))  # some Swin stages alone
    assert model.backbone[0].use_checkpoint == (0, 1) and model.decoder.use_checkpoint is True
    assert model.enhancer.use_checkpoint is False and not stage.use_checkpoint
    model.backbone = nn.Sequential(nn.Linear(2, 2))
    _set_checkpointing(model, ("enhancer",))  # a part without checkpointing, not asked: fine
    with pytest.raises(ValueError, match="backbone has no activation checkpointing"):
        _set_checkpointing(model, ("backbone",))


def test_peak_allocated_sees_a_freed_tensor():
    """The sampled peak of malloc's allocated bytes includes a 256 MB tensor that lived for
    0.2 s inside the block and was freed before its end."""
    from grounding_dino.comparison.allocated import PeakAllocated

    with PeakAllocated() as before:
        pass
    with PeakAllocated() as allocated:
        tensor = torch.ones(64, 1024, 1024)  # 256 MB
        time.sleep(0.2)
        del tensor
    assert before.peak_mb is not None and allocated.peak_mb is not None
    assert allocated.peak_mb - before.peak_mb > 250
