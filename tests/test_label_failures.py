"""``python -m grounding_dino.label`` with images that fail: a decompression bomb and an image on
which the model raises go to ``<output>.errors`` and the run goes on; reruns try them again up
to ``--max-attempts`` times and then skip them, as they skip an image in whose batch the
labeller died every time. Several machines: a missing peer is named after ``--peer-timeout``;
``repair_tails`` leaves a part file alone while its writer holds the lock.
"""

import fcntl
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from PIL import Image
from test_image_reading import _png_of_zeros
from test_label import CLASS_LIST, ENV, OVERRIDES, REPO, _assert_same_dataset, _image, _read

from grounding_dino.io.parts import PartWriter, read_parts, repair_tails
from grounding_dino.label.cli import main
from grounding_dino.model_zoo import get_config, get_config_file
from grounding_dino.predictor import GroundingDINOPredictor

GOOD = ["a.png", "b.png", "c.png", "rotated.jpg"]
MODEL_FAILS_WIDTH = 77  # the patched model raises on images of this width


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from detectron2.config import instantiate

    cfg = get_config("shapes_tiny.py")
    cfg.model.query_selector.num_queries = 20
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return str(path)


def _arguments(weights, images, output, *extra):
    return [
        "--config-file",
        get_config_file("shapes_tiny.py"),
        "--weights",
        weights,
        "--input",
        str(images),
        "--classes",
        CLASS_LIST,
        "--output",
        str(output),
        "--box-threshold",
        "0",
        "--max-per-image",
        "12",
        *extra,
        "--opts",
        *OVERRIDES,
    ]


@pytest.fixture
def failing_model(monkeypatch):
    """The predictor raises a RuntimeError (as an out-of-memory error would) on any batch with
    an image ``MODEL_FAILS_WIDTH`` pixels wide."""
    original = GroundingDINOPredictor.predict_batch

    def predict_batch(self, images, *args, **kwargs):
        if any(image.shape[1] == MODEL_FAILS_WIDTH for image in images):
            raise RuntimeError("simulated: out of memory on this image")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(GroundingDINOPredictor, "predict_batch", predict_batch)


def _run(capsys, weights, images, output, *extra):
    status = main(_arguments(weights, images, output, "--decode-workers", "0", *extra))
    out, err = capsys.readouterr()
    return status, out, err


def _errors(output):
    lines = Path(f"{output}.errors").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines)


def test_bad_images_are_reported_retried_then_skipped(tmp_path, weights, failing_model, capsys):
    images, good_only = tmp_path / "photos", tmp_path / "good"
    images.mkdir()
    good_only.mkdir()
    for i, name in enumerate(GOOD):
        if name == "rotated.jpg":  # a phone photo: stored 130 wide, 80 high, shown upright
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(_image(i, 80, 130)).save(images / name, exif=exif)
        else:
            cv2.imwrite(str(images / name), _image(i, 90 + 9 * i, 120 - 7 * i))
        shutil.copy(images / name, good_only / name)
    cv2.imwrite(str(images / "model_fails.png"), _image(7, 64, MODEL_FAILS_WIDTH))
    _png_of_zeros(images / "bomb.png", 14000, 14000)
    bomb, model_fails = str(images / "bomb.png"), str(images / "model_fails.png")
    output = tmp_path / "out" / "labels.json"
    max_attempts = ("--max-attempts", "2")

    # Run 1: both bad images reported, the good ones labelled (the batch of 2 that holds
    # model_fails.png is labelled again one by one).
    status, out, err = _run(capsys, weights, images, output, "--batch-size", "2", *max_attempts)
    assert status == 1, out + err
    assert f"ERROR {bomb}: cannot read the image: too many pixels" in err
    assert f"ERROR {model_fails}: RuntimeError: simulated" in err
    errors = _errors(output)
    assert sorted(errors) == [bomb, model_fails]
    assert "decompression bomb" in errors[bomb]
    assert errors[model_fails] == "RuntimeError: simulated: out of memory on this image"
    clean = tmp_path / "clean" / "labels.json"
    assert _run(capsys, weights, good_only, clean)[0] == 0
    _assert_same_dataset(_read(output), _read(clean))
    rotated = [im for im in _read(output)["images"] if im["file_name"] == "rotated.jpg"]
    assert (rotated[0]["width"], rotated[0]["height"]) == (80, 130)  # the upright frame

    # Run 2 tries them again (attempt 2 of 2); run 3 skips them without trying.
    status, out, err = _run(capsys, weights, images, output, *max_attempts)
    assert status == 1 and "4 already labelled, 2 to do" in out, out + err
    status, out, err = _run(capsys, weights, images, output, *max_attempts)
    assert status == 1
    assert "4 already labelled, 2 skipped after 2 failed attempts, 0 to do" in out, out
    assert "2 images were skipped after 2 failed attempts" in err
    errors = _errors(output)
    assert errors[model_fails] == (
        "skipped after 2 failed attempts; the last: RuntimeError: simulated: out of memory on "
        "this image"
    )
    assert errors[bomb].startswith("skipped after 2 failed attempts; the last: cannot read")
    _assert_same_dataset(_read(output), _read(clean))

    # An image in whose batch the labeller died twice (attempt lines, no result: what two
    # kill -9s by the OOM killer leave) is skipped too, never retried in a loop.
    cv2.imwrite(str(images / "kills.png"), _image(9, 80, 80))
    with PartWriter(str(output) + ".parts", 0) as writer:
        for _ in range(2):
            writer.mark_attempt([(str(images / "kills.png"), "kills.png")])
    assert read_parts(str(output) + ".parts").unfinished["kills.png"]["attempts"] == 2
    status, out, err = _run(capsys, weights, images, output, *max_attempts)
    assert status == 1 and "3 skipped after 2 failed attempts, 0 to do" in out, out
    assert _errors(output)[str(images / "kills.png")].startswith(
        "skipped after 2 attempts: the labeller died each time"
    )
    _assert_same_dataset(_read(output), _read(clean))

    # A larger --max-attempts tries them again.
    status, out, err = _run(capsys, weights, images, output, "--max-attempts", "4")
    assert "3 to do" in out and "kills.png" not in _errors(output)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_machine_is_named_after_the_peer_timeout(tmp_path, weights):
    images = tmp_path / "photos"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), _image(0, 64, 64))
    output = tmp_path / "labels.json"
    multi = ["--num-machines", "2", "--dist-url", f"tcp://127.0.0.1:{_free_port()}"]
    command = [sys.executable, "-m", "grounding_dino.label"]
    command += _arguments(weights, images, output, *multi, "--peer-timeout", "3")
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "rank(s) 1 (machine(s) 1) did not join" in done.stderr and "within 3 s" in done.stderr
    assert "run the same command again" in done.stderr
    assert seconds < 120  # not the process group's 30 minutes
    assert not output.exists()


def test_repair_tails_leaves_a_locked_part_file_alone(tmp_path):
    part = tmp_path / "part-00000.jsonl"
    part.write_text('{"file_name":"a.png"}\n{"file_name":"b.p')
    size = part.stat().st_size
    with open(part, "a") as holder:  # another worker, here or on another machine
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        assert repair_tails(str(tmp_path)) == 0 and part.stat().st_size == size
    assert repair_tails(str(tmp_path)) == 1
    assert part.read_text() == '{"file_name":"a.png"}\n'


def test_machine_0_missing_is_named(tmp_path):
    from datetime import timedelta

    from grounding_dino.engine.launch import join_process_group

    url = f"tcp://127.0.0.1:{_free_port()}"  # nobody serves it
    with pytest.raises(RuntimeError, match=r"rank 0 \(machine 0\) did not answer .* within 2 s"):
        join_process_group(url, 2, 1, 1, timedelta(minutes=30), timedelta(seconds=2))


def test_result_files_are_written_whole_with_the_usual_mode(tmp_path):
    import os

    from grounding_dino.io.coco_files import write_errors, write_json_atomic

    output = tmp_path / "labels.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    # the old predictable temporary name, planted as a symlink: never followed
    (tmp_path / f"labels.json.tmp-{os.getpid()}").symlink_to(victim)
    mask = os.umask(0o022)
    try:
        write_json_atomic(str(output), {"images": []})
        write_errors(str(output) + ".errors", [{"path": "a.png", "error": "bad\nthing"}])
    finally:
        os.umask(mask)
    assert _read(output) == {"images": []} and victim.read_text() == "mine"
    assert Path(f"{output}.errors").read_text() == "a.png\tbad thing\n"
    assert (output.stat().st_mode & 0o777) == 0o644
    leftovers = {p.name for p in tmp_path.iterdir()} - {
        "labels.json",
        "labels.json.errors",
        "victim.txt",
        f"labels.json.tmp-{os.getpid()}",
    }
    assert not leftovers
