"""``demo/demo.py`` and the library it runs on (:mod:`grounding_dino.io`): never writes over an
input, keeps relative paths, writes ``--json`` as it goes, and removes duplicate boxes with
``--nms``. A stub predictor stands in for the model in the library tests (what is tested is the
file handling; the model's outputs are tested elsewhere); the script itself runs as a user runs
it, in a subprocess."""

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from hostile_images import gray_png_bomb, not_an_image
from nms_reference import nms_output

from grounding_dino import InferenceSettings
from grounding_dino.io.coco_files import JsonListWriter
from grounding_dino.io import detect_files
from grounding_dino.io.detect_files import FileDetector, open_video_writer
from grounding_dino.io.inputs import expand_inputs, plan_outputs
from grounding_dino.preprocessing import parse_prompt

REPO = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, str(REPO / "demo" / "demo.py")]
PROMPT = ["cat", "dog"]


class StubPredictor:
    """Three boxes per image: two of class 0 overlapping (IoU 0.9), one of class 1. Applies
    the settings' NMS as the predictor's post-processing does (that equality is tested in
    test_inference_api.py), and records the settings of the last call."""

    def __init__(self):
        self.calls = 0
        self.interrupt_at = None
        self.fail_at = None
        self.settings = InferenceSettings()
        self.last_settings = None

    def __call__(self, image, prompt, settings=None):
        self.calls += 1
        self.last_settings = settings
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.calls == self.fail_at:
            raise RuntimeError("the model failed on this image")
        height, width = image.shape[:2]
        boxes = torch.tensor([[10.0, 10, 40, 40], [10, 10, 40, 37], [12, 12, 38, 38]])
        instances = Instances(
            (height, width),
            pred_boxes=Boxes(boxes),
            scores=torch.tensor([0.9, 0.8, 0.7]),
            pred_classes=torch.tensor([0, 0, 1]),
        )
        output = {"instances": instances, "phrases": ["cat", "cat", "dog"]}
        return nms_output(output, settings.nms_threshold, settings.max_detections)


def _write(path: Path, seed: int, height: int = 64, width: int = 80) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return path.read_bytes()


def _detect(inputs, output=None, json_path=None, stub=None, settings=None, replace=False) -> list:
    """What ``demo/demo.py --input INPUTS [--output] [--json] [--force]`` does, with ``stub``
    as the model. Returns the error messages."""
    inputs = [str(p) for p in inputs]
    paths, errors = expand_inputs(inputs)
    targets = plan_outputs(str(output) if output else None, inputs, paths)
    stub = stub or StubPredictor()
    if json_path is None:
        detector = FileDetector(stub, PROMPT, settings, targets=targets, replace=replace)
        return errors + detector.run(paths)
    with JsonListWriter(str(json_path), replace=replace) as writer:
        detector = FileDetector(
            stub, PROMPT, settings, targets=targets, json_writer=writer, replace=replace
        )
        return errors + detector.run(paths)


def test_output_inside_the_input_folder_never_overwrites_an_input(tmp_path):
    photos = tmp_path / "photos"
    originals = {name: _write(photos / name, i) for i, name in enumerate(["a.png", "b.jpg"])}
    # The script refuses before it loads a model (the config file does not even exist).
    command = [sys.executable, str(REPO / "demo" / "demo.py"), "--config-file", "missing.py"]
    command += ["--prompt", "cat, dog", "--input", str(photos), "--output", str(photos)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "would overwrite the input" in done.stderr
    assert {p.name: p.read_bytes() for p in photos.glob("*.*")} == originals
    image = str(photos / "a.png")
    with pytest.raises(ValueError, match="would overwrite the input"):  # drawn onto itself
        plan_outputs(image, [image], [image])

    # A subfolder of the inputs is fine: nothing collides (folders are not searched in depth).
    # Drawings that exist are not replaced without --force (replace=True).
    assert _detect([photos], output=photos / "drawn") == []
    drawn = {p.name: p.read_bytes() for p in (photos / "drawn").iterdir()}
    assert sorted(drawn) == ["a.png", "b.jpg"]
    errors = _detect([photos], output=photos / "drawn")
    assert len(errors) == 2 and all("exists; not replaced" in e and "--force" in e for e in errors)
    assert _detect([photos], output=photos / "drawn", replace=True) == []
    assert {p.name: p.read_bytes() for p in (photos / "drawn").iterdir()} == drawn
    assert {p.name: p.read_bytes() for p in photos.glob("*.*")} == originals


def test_same_names_in_different_folders_keep_their_relative_paths(tmp_path):
    _write(tmp_path / "in" / "x" / "a.png", 0, 64, 80)
    _write(tmp_path / "in" / "y" / "a.png", 1, 72, 96)
    out = tmp_path / "out"
    assert _detect([tmp_path / "in" / "x" / "a.png", tmp_path / "in/y/*.png"], output=out) == []
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["x/a.png", "y/a.png"]
    assert cv2.imread(str(out / "x" / "a.png")).shape == (64, 80, 3)
    assert cv2.imread(str(out / "y" / "a.png")).shape == (72, 96, 3)


def test_json_is_written_image_by_image(tmp_path):
    for i in range(4):
        _write(tmp_path / "in" / f"{i}.png", i)
    results = tmp_path / "results.json"
    stub = StubPredictor()
    stub.interrupt_at = 3  # Ctrl-C while the third image runs
    every_box = InferenceSettings(nms_threshold=0)
    with pytest.raises(KeyboardInterrupt):
        _detect([tmp_path / "in"], json_path=results, stub=stub, settings=every_box)
    records = json.loads(results.read_text())
    assert [r["image_id"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert {Path(r["file_name"]).name for r in records} == {"0.png", "1.png"}

    # The interrupted list was renamed into place; a rerun replaces it only when asked.
    with pytest.raises(FileExistsError, match=f"{results} exists.*--force"):
        _detect([tmp_path / "in"], json_path=results, settings=every_box)
    assert json.loads(results.read_text()) == records
    assert _detect([tmp_path / "in"], json_path=results, settings=every_box, replace=True) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "results.json"]  # no temporary
    full = json.loads(results.read_text())
    assert full[:6] == records and len(full) == 12
    assert full[0] == {
        "image_id": 0,
        "category_id": 0,
        "bbox": [10.0, 10.0, 30.0, 30.0],
        "score": pytest.approx(0.9),
        "phrase": "cat",
        "file_name": str(tmp_path / "in" / "0.png"),
    }


def test_nms_removes_duplicates_per_class(tmp_path):
    _write(tmp_path / "a.png", 0)
    kept = {}
    for nms in (0.5, 0.95, 0):
        results, stub = tmp_path / f"nms{nms}.json", StubPredictor()
        settings = stub.settings.replace(nms_threshold=nms)
        assert _detect([tmp_path / "a.png"], json_path=results, stub=stub, settings=settings) == []
        assert stub.last_settings.nms_threshold == nms
        kept[nms] = [(r["phrase"], r["score"]) for r in json.loads(results.read_text())]
    approx = pytest.approx
    # IoU of the two "cat" boxes is 0.9; the "dog" box overlaps them but is another class.
    assert kept[0.5] == [("cat", approx(0.9)), ("dog", approx(0.7))]
    assert (
        kept[0.95] == kept[0] == [("cat", approx(0.9)), ("cat", approx(0.8)), ("dog", approx(0.7))]
    )


def test_unreadable_files_are_errors_and_the_rest_go_on(tmp_path):
    _write(tmp_path / "in" / "a.png", 0)
    (tmp_path / "in" / "b.jpg").write_bytes(b"not a picture")
    errors = _detect([tmp_path / "in", tmp_path / "missing*.png"], output=tmp_path / "out")
    assert len(errors) == 2
    assert "missing*.png" in errors[0] and "b.jpg: cannot read the image" in errors[1]
    # The glob's folder is part of the inputs' common folder: drawings go to out/in/.
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.glob("out/**/*.png")] == ["out/in/a.png"]


def test_parse_prompt():
    assert parse_prompt("cat . remote control .") == "cat . remote control ."
    assert parse_prompt(" cat, remote control ,") == ["cat", "remote control"]
    assert parse_prompt("the cat, on the left", split_commas=False) == "the cat, on the left"
    assert parse_prompt(None) is None
    with pytest.raises(ValueError, match="holds no class names"):
        parse_prompt(" , ")


def test_any_failure_of_one_file_is_reported_and_the_rest_go_on(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        _write(tmp_path / "in" / name, i)
    bomb = gray_png_bomb(tmp_path / "in" / "bomb.png")  # 20000x20000 gray in 1.7 MB
    stub = StubPredictor()
    stub.fail_at = 2  # a RuntimeError from the model on b.png
    results = tmp_path / "results.json"
    errors = _detect([tmp_path / "in"], tmp_path / "out", results, stub)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{tmp_path / 'in' / 'b.png'}: RuntimeError: the model failed")
    assert errors[1].startswith(f"{bomb}: ")  # refused or failed, never decoded
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    records = json.loads(results.read_text())
    assert sorted({Path(r["file_name"]).name for r in records}) == ["a.png", "c.png"]


def _clip(path: Path, codec: str, frames: int = 3) -> str:
    writer = open_video_writer(str(path), 5, (96, 72), codec=codec)
    for k in range(frames):
        writer.write(np.full((72, 96, 3), 40 * k, np.uint8))
    writer.release()
    return str(path)


def test_video_drawings_use_a_codec_of_their_container_and_a_failed_writer_is_an_error(
    tmp_path, monkeypatch
):
    clip = _clip(tmp_path / "clip.webm", "VP80")
    out = tmp_path / "out" / "clip.webm"
    assert FileDetector(StubPredictor(), PROMPT, targets={clip: str(out)}).run([clip]) == []
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()

    with pytest.raises(ValueError, match=r"x\.webm: cv2\.VideoWriter cannot write .*codec mp4v"):
        open_video_writer(str(tmp_path / "x.webm"), 5, (96, 72), codec="mp4v")
    # Through the demo: the same failure is the video's error, and no file is left behind.
    monkeypatch.setattr(detect_files, "VIDEO_CODECS", {".webm": "mp4v"})
    target = tmp_path / "failed" / "clip.webm"
    errors = FileDetector(StubPredictor(), PROMPT, targets={clip: str(target)}).run([clip])
    assert len(errors) == 1 and "cv2.VideoWriter cannot write" in errors[0], errors
    assert f"{clip}: {target}: cv2.VideoWriter cannot write" in errors[0], errors
    assert "codec mp4v" in errors[0]
    assert list((tmp_path / "failed").iterdir()) == []


def _demo_main():
    spec = importlib.util.spec_from_file_location("demo_cli", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_cli_refuses_existing_results_before_it_loads_a_model(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "photos" / "a.png", 0)
    (tmp_path / "results.json").write_text("my own results")
    _write(tmp_path / "out" / "a.png", 1)
    (tmp_path / "new.json.errors").write_text("my notes")
    # The config file does not exist: each refusal comes before the model is built.
    common = ["--config-file", "missing.py", "--prompt", "cat", "--input", "photos"]
    done = subprocess.run(
        [*DEMO, *common, "--json", "results.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "--json: results.json exists; this command does not write over files: pass --force" in (
        done.stderr
    )
    # The other refusals through the same main() in this process (a subprocess each is slow).
    monkeypatch.chdir(tmp_path)
    main = _demo_main()
    cases = [
        (["--output", "out"], "--output out: out/a.png exists"),
        (["--json", "new.json"], "--errors: new.json.errors exists"),
        (["--output", "drawn", "--errors", "photos/a.png"], "--errors photos/a.png is one of"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(common + extra)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in stderr, stderr
        assert "--force" in stderr or "one of the inputs" in stderr
    assert (tmp_path / "results.json").read_text() == "my own results"
    assert (tmp_path / "new.json.errors").read_text() == "my notes"
    assert not (tmp_path / "drawn").exists()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Random weights of configs/shapes_tiny.py, saved as detectron2's checkpointer does."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate

    from grounding_dino.model_zoo import get_config

    torch.manual_seed(0)
    model = instantiate(get_config("shapes_tiny.py").model)
    folder = tmp_path_factory.mktemp("demo_weights")
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


def test_the_cli_reports_failures_replaces_only_with_force_and_writes_new_file_modes(
    tmp_path, tiny_weights
):
    photos = tmp_path / "photos"
    _write(photos / "good.png", 0, 96, 128)
    gray_png_bomb(photos / "bomb.png")
    not_an_image(photos / "notes.jpg")
    (tmp_path / "results.json").write_text("an earlier run's results")
    command = [*DEMO, "--config-file", str(REPO / "configs" / "shapes_tiny.py")]
    command += ["--weights", tiny_weights, "--input", "photos", "--prompt", "red square"]
    command += ["--json", "results.json", "--output", "out", "--force", "--box-threshold", "0"]
    command += ["--opts", "model.max_detections=3", "train.device=cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert "2 input(s) failed (listed in results.json.errors)" in done.stderr, done.stderr
    report = (tmp_path / "results.json.errors").read_text().splitlines()
    assert [line.split(":")[0] for line in report] == ["photos/bomb.png", "photos/notes.jpg"]
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 3 and {r["file_name"] for r in records} == {"photos/good.png"}
    assert cv2.imread(str(tmp_path / "out" / "good.png")).shape == (96, 128, 3)
    mode = 0o666 & ~_umask()
    for path in ["results.json", "results.json.errors", "out/good.png"]:
        assert stat.S_IMODE(os.stat(tmp_path / path).st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "photos",
        "results.json",
        "results.json.errors",
    ]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_draw_fills_masks_in_the_colour_of_their_phrase():
    """detectron2's Visualizer draws ``pred_masks``: pixels of the mask change (also outside
    the box), pixels of neither stay as they were."""
    from grounding_dino.visualization import draw

    image = np.full((80, 100, 3), 128, np.uint8)
    masks = torch.zeros((1, 80, 100), dtype=torch.bool)
    masks[0, 50:70, 60:90] = True
    instances = Instances(
        (80, 100),
        pred_boxes=Boxes(torch.tensor([[5.0, 5, 30, 30]])),
        scores=torch.tensor([0.9]),
        pred_classes=torch.tensor([0]),
    )
    without = draw(image, {"instances": instances, "phrases": ["cat"]})
    instances.pred_masks = masks
    drawn = draw(image, {"instances": instances, "phrases": ["cat"]})
    inside = drawn[55:65, 65:85].astype(int)
    assert np.abs(inside - 128).sum(axis=2).min() > 10  # filled, every pixel
    assert np.array_equal(without[55:65, 65:85], image[55:65, 65:85, ::-1])
    assert np.array_equal(drawn[2:12, 70:98], image[2:12, 70:98])  # neither box, label nor mask


def test_the_cli_with_sam_writes_rle_masks_and_draws_them(tmp_path, tiny_weights):
    """``--sam DIR``: every --json record has an RLE ``segmentation`` that pycocotools decodes
    to the mask the stage gives for the predictor's box; the drawing shows the masks."""
    from pycocotools import mask as mask_utils
    from sam_reference import tiny_segmenter_folder

    from grounding_dino.predictor import GroundingDINOPredictor
    from grounding_dino.segment import MaskStage
    from grounding_dino.visualization import draw

    sam = tiny_segmenter_folder("sam", tmp_path / "sam")[2]
    _write(tmp_path / "photo.png", 0, 96, 128)
    overrides = ["model.max_detections=3", "train.device=cpu"]
    command = [*DEMO, "--config-file", str(REPO / "configs" / "shapes_tiny.py")]
    command += ["--weights", tiny_weights, "--input", "photo.png", "--prompt", "red square"]
    command += ["--json", "results.json", "--output", "drawn.png", "--box-threshold", "0"]
    command += ["--sam", sam, "--opts", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "photo.png: 3 masks (" in done.stdout
    records = json.loads((tmp_path / "results.json").read_text())

    image = cv2.imread(str(tmp_path / "photo.png"))
    stage = MaskStage.from_pretrained(sam)
    predictor = GroundingDINOPredictor.from_config_file(
        str(REPO / "configs" / "shapes_tiny.py"), weights=tiny_weights, overrides=overrides
    )
    settings = predictor.settings.replace(box_threshold=0.0, nms_threshold=0.5)
    output = predictor(image, parse_prompt("red square", True), settings)
    want = stage(np.ascontiguousarray(image[:, :, ::-1]), output["instances"].pred_boxes.tensor)
    assert len(records) == len(want.masks) == 3
    for record, mask, logits in zip(records, want.masks, want.logits):
        rle = record["segmentation"]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        differ = torch.from_numpy(decoded.astype(bool)) != mask
        assert not differ.any() or logits[differ].abs().max() < 1e-4  # only at the threshold
    drawing = cv2.imread(str(tmp_path / "drawn.png"))[:, :, ::-1].astype(int)
    output["instances"].pred_masks = want.masks
    with_masks = draw(image, output)
    output["instances"].remove("pred_masks")
    without = draw(image, output)
    assert np.abs(drawing - with_masks).mean() < 0.5 < np.abs(drawing - without).mean()
