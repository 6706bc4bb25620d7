"""``demo/demo.py``: never writes over an input, keeps relative paths, writes ``--json`` as it
goes, and removes duplicate boxes with ``--nms``. A stub predictor stands in for the model
(what is tested is the CLI's file handling; the model's outputs are tested elsewhere)."""

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from grounding_dino import InferenceSettings
from grounding_dino.modeling.nms import nms_output

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("gdino_demo_cli", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stub = StubPredictor()
    monkeypatch.setattr(module, "build_predictor", lambda args: (stub, None))
    module.stub = stub
    return module


class StubPredictor:
    """Three boxes per image: two of class 0 overlapping (IoU 0.9), one of class 1. Applies
    the settings' NMS as the predictor's post-processing does (that equality is tested in
    test_inference_api.py), and records the settings of the last call."""

    def __init__(self):
        self.calls = 0
        self.interrupt_at = None
        self.settings = InferenceSettings()
        self.last_settings = None

    def __call__(self, image, prompt, settings=None):
        self.calls += 1
        self.last_settings = settings
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
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


def _args(*inputs, **flags):
    argv = ["--config-file", "stubbed.py", "--prompt", "cat, dog", "--input", *map(str, inputs)]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def test_output_inside_the_input_folder_never_overwrites_an_input(demo, tmp_path, capsys):
    photos = tmp_path / "photos"
    originals = {name: _write(photos / name, i) for i, name in enumerate(["a.png", "b.jpg"])}
    with pytest.raises(SystemExit) as stop:
        demo.main(_args(photos, output=photos))
    assert stop.value.code == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert demo.stub.calls == 0  # refused before any work
    assert {p.name: p.read_bytes() for p in photos.glob("*.*")} == originals
    with pytest.raises(SystemExit):  # a single image drawn onto itself
        demo.main(_args(photos / "a.png", output=photos / "a.png"))
    assert (photos / "a.png").read_bytes() == originals["a.png"]

    # A subfolder of the inputs is fine: nothing collides (folders are not searched in depth).
    for _ in range(2):
        assert demo.main(_args(photos, output=photos / "drawn")) == 0
    assert sorted(p.name for p in (photos / "drawn").iterdir()) == ["a.png", "b.jpg"]
    assert {p.name: p.read_bytes() for p in photos.glob("*.*")} == originals


def test_same_names_in_different_folders_keep_their_relative_paths(demo, tmp_path):
    _write(tmp_path / "in" / "x" / "a.png", 0, 64, 80)
    _write(tmp_path / "in" / "y" / "a.png", 1, 72, 96)
    out = tmp_path / "out"
    code = demo.main(_args(tmp_path / "in" / "x" / "a.png", tmp_path / "in/y/*.png", output=out))
    assert code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["x/a.png", "y/a.png"]
    assert cv2.imread(str(out / "x" / "a.png")).shape == (64, 80, 3)
    assert cv2.imread(str(out / "y" / "a.png")).shape == (72, 96, 3)


def test_json_is_written_image_by_image(demo, tmp_path):
    for i in range(4):
        _write(tmp_path / "in" / f"{i}.png", i)
    results = tmp_path / "results.json"
    demo.stub.interrupt_at = 3  # Ctrl-C while the third image runs
    with pytest.raises(KeyboardInterrupt):
        demo.main(_args(tmp_path / "in", json=results, nms=0))
    records = json.loads(results.read_text())
    assert [r["image_id"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert {Path(r["file_name"]).name for r in records} == {"0.png", "1.png"}

    demo.stub.calls, demo.stub.interrupt_at = 0, None
    assert demo.main(_args(tmp_path / "in", json=results, nms=0)) == 0
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


def test_nms_removes_duplicates_per_class(demo, tmp_path):
    _write(tmp_path / "a.png", 0)
    kept = {}
    for nms in (0.5, 0.95, 0):
        results = tmp_path / f"nms{nms}.json"
        assert demo.main(_args(tmp_path / "a.png", json=results, nms=nms)) == 0
        assert demo.stub.last_settings.nms_threshold == nms
        kept[nms] = [(r["phrase"], r["score"]) for r in json.loads(results.read_text())]
    approx = pytest.approx
    # IoU of the two "cat" boxes is 0.9; the "dog" box overlaps them but is another class.
    assert kept[0.5] == [("cat", approx(0.9)), ("dog", approx(0.7))]
    assert (
        kept[0.95] == kept[0] == [("cat", approx(0.9)), ("cat", approx(0.8)), ("dog", approx(0.7))]
    )
