"""ODinW-13/35: the suites, their registration from a root folder, and tools/evaluate_odinw.py."""

import collections
import contextlib
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding_dino.data.datasets.odinw import ODINW_SUITES, register_odinw_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Two datasets of ODinW-13 in GLIP's layout: a Roboflow split folder and an "export" folder.
FAKE = {
    "pothole": ("pothole/valid/annotations_without_background.json", "pothole/valid", ["pothole"]),
    "pistols_export": (
        "pistols/export/val_annotations_without_background.json",
        "pistols/export",
        ["pistol", "knife"],
    ),
}


def _write_odinw(root):
    """Writes the FAKE datasets (3 images each, category ids with a gap) under ``root``."""
    rng = np.random.default_rng(0)
    for key, (json_rel, image_rel, classes) in FAKE.items():
        image_dir = os.path.join(root, image_rel)
        os.makedirs(image_dir, exist_ok=True)
        categories = [
            {"id": 1 + 2 * i, "name": n, "supercategory": "x"} for i, n in enumerate(classes)
        ]
        images, annotations = [], []
        for image_id in range(1, 4):
            image = np.full((120, 160, 3), 200, np.uint8)
            for k in range(2):
                x, y = int(rng.integers(0, 100)), int(rng.integers(0, 60))
                w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                cv2.rectangle(image, (x, y), (x + w, y + h), (40, 40, 160), -1)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": categories[k % len(categories)]["id"],
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            name = f"{key}_{image_id}.jpg"
            cv2.imwrite(os.path.join(image_dir, name), image)
            images.append({"id": image_id, "file_name": name, "height": 120, "width": 160})
        with open(os.path.join(root, json_rel), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def test_suites_follow_glip():
    assert len(ODINW_SUITES["odinw13"]) == 13 and len(ODINW_SUITES["odinw35"]) == 35
    assert set(ODINW_SUITES["odinw13"]) < set(ODINW_SUITES["odinw35"])
    assert len(set(ODINW_SUITES["odinw35"])) == 35


def test_register_suite_reports_missing(tmp_path):
    _write_odinw(str(tmp_path))
    found = register_odinw_suite(str(tmp_path), "odinw13")
    assert found.registered == ["odinw_pistols_export", "odinw_pothole"]  # suite order
    assert len(found.missing) == 11
    assert found.missing["odinw_PascalVOC"] == (
        f"{tmp_path}/PascalVOC/valid/annotations_without_background.json does not exist"
    )
    from grounding_dino.data.datasets import get_thing_classes

    assert get_thing_classes("odinw_pistols_export") == ["pistol", "knife"]
    # A second call (same files) keeps the registration; a subset by name, with or without prefix.
    again = register_odinw_suite(str(tmp_path), "odinw35", ["pothole", "odinw_WildfireSmoke"])
    assert again.registered == ["odinw_pothole"] and list(again.missing) == ["odinw_WildfireSmoke"]
    with pytest.raises(ValueError, match="not a dataset of odinw13"):
        register_odinw_suite(str(tmp_path), "odinw13", ["WildfireSmoke"])
    with pytest.raises(ValueError, match="Unknown ODinW suite 'odinw7'"):
        register_odinw_suite(str(tmp_path), "odinw7")


def _coco_ap(json_file, results_file, max_dets):
    """AP (percent) of a detectron2 results dump, computed with pycocotools directly."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        with open(results_file) as f:
            results = json.load(f)
        evaluation = COCOeval(gt, gt.loadRes(results) if results else COCO(), "bbox")
        evaluation.params.maxDets = [1, 10, max_dets]
        evaluation.evaluate()
        evaluation.accumulate()
    # precision [IoU thresholds, recall points, classes, areas, maxDets]: area "all", max_dets
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    return 100 * float(precision[precision > -1].mean())


def _random_weights(model, path):
    """A checkpoint of ``model`` (the tool refuses to run a model without weights)."""
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_evaluate_odinw_command(tmp_path, tiny_model):
    root, output = tmp_path / "odinw", tmp_path / "out"
    _write_odinw(str(root))
    command = [
        PYTHON,
        os.path.join(REPO, "tools", "evaluate_odinw.py"),
        "--config-file",
        os.path.join(REPO, "configs", "shapes_tiny.py"),
        "--weights",
        _random_weights(tiny_model, tmp_path / "random.pth"),  # shapes_tiny.py, random
        "--root",
        str(root),
        "--suite",
        "odinw13",
        "--output",
        str(output),
        "train.device=cpu",
        "dataloader.test.num_workers=0",
        # Display settings: the evaluation must not use them (evaluation_settings).
        "model.max_detections=2",
        "model.box_threshold=0.99",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    with open(output / "odinw_results.json") as f:
        summary = json.load(f)

    names = ["odinw_pistols_export", "odinw_pothole"]
    assert list(summary["datasets"]) == names
    assert summary["num_evaluated"] == 2 and summary["suite_size"] == 13
    assert len(summary["missing"]) == 11 and "odinw_PascalVOC" in summary["missing"]
    for name in names:
        key = name[len("odinw_") :]
        ap = _coco_ap(
            str(root / FAKE[key][0]),
            str(output / name / "coco_instances_results.json"),
            max_dets=300,  # the zero-shot evaluator's default
        )
        assert summary["datasets"][name]["AP"] == pytest.approx(ap, abs=1e-6)
        with open(output / name / "coco_instances_results.json") as f:
            per_image = collections.Counter(d["image_id"] for d in json.load(f))
        assert min(per_image.values()) > 2  # neither max_detections=2 nor the 0.99 threshold
        assert summary["datasets"][name]["num_classes"] == len(FAKE[key][2])
        assert summary["datasets"][name]["num_images"] == 3
        row = next(line for line in run.stdout.splitlines() if line.startswith(f"| {name} "))
        assert f"{summary['datasets'][name]['AP']:.2f}" in row
    average = np.mean([summary["datasets"][n]["AP"] for n in names])
    assert summary["average_AP"] == pytest.approx(average)
    assert f"odinw13 average AP over 2 of 13 datasets: {average:.2f}" in run.stdout
    assert "Missing (11):" in run.stdout and "odinw_PascalVOC:" in run.stdout

    # The results file is never overwritten.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already exists; pass another --output" in again.stderr
