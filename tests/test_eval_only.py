"""``train_net.py --eval-only`` on a converted checkpoint and a small registered dataset: the AP
it reports is the COCO AP of that checkpoint's detections, checked against an answer known by
construction."""

import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, pairwise_iou

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 96, 128
# Not 1 and 2: the evaluator must map the model's class indices back to the json's ids.
CATEGORIES = [{"id": 3, "name": "red box"}, {"id": 7, "name": "cat"}]

EVAL_CONFIG = """
import os

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "eval_only_fixture"
if NAME not in DatasetCatalog.list():
    register_coco_instances(NAME, {{}}, os.path.join(HERE, "coco.json"),
                            os.path.join(HERE, "images"))

_converted = LazyConfig.load({converted!r})
model, train = _converted.model, _converted.train
dataloader = LazyConfig.load(os.path.join({repo!r}, "configs/common/data/coco_detection.py"))
dataloader = dataloader.dataloader
dataloader.test.dataset.names = NAME
dataloader.test.mapper.augmentations.min_size = {height}  # the image's size: no resize
dataloader.test.mapper.augmentations.max_size = {width}
dataloader.test.num_workers = 0
train.output_dir = os.path.join(HERE, "output")
"""


def _image():
    """An RGB image with a red rectangle (PNG: the file holds exactly these pixels)."""
    image = np.full((HEIGHT, WIDTH, 3), 180, np.uint8)
    image[10:61, 10:51] = (200, 0, 0)
    image[70:90, 80:120] = (0, 0, 200)
    return image


def _detections(model, image):
    """The model's detections of ``image`` for the dataset's categories, computed here
    (not by train_net): what an evaluation sees (no score threshold, 300 per image)."""
    record = {
        "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "height": HEIGHT,
        "width": WIDTH,
        "category_names": [c["name"] for c in CATEGORIES],
    }
    settings = model.inference_settings.replace(box_threshold=-math.inf, max_detections=300)
    (output,) = model.inference([record], settings=settings)
    return output["instances"]


def _box_missed_by_every_detection(detections):
    """An 8x8 box (xyxy) whose IoU with every detection is below 0.25 (COCO's lowest
    threshold is 0.5): a ground truth no detection can match."""
    candidates = torch.tensor(
        [[x, y, x + 8.0, y + 8.0] for y in range(0, HEIGHT - 8, 4) for x in range(0, WIDTH - 8, 4)]
    )
    best = pairwise_iou(Boxes(candidates), detections.pred_boxes).max(dim=1).values
    index = int(best.argmin())
    assert best[index] < 0.25, f"every candidate box is covered (IoU {best[index]:.2f})"
    return candidates[index]


def _xywh(box):
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _write_dataset(root, red_box, cat_box):
    os.makedirs(os.path.join(root, "images"))
    cv2.imwrite(os.path.join(root, "images", "1.png"), cv2.cvtColor(_image(), cv2.COLOR_RGB2BGR))
    annotations = []
    for category_id, box in ((3, red_box), (7, cat_box)):
        x, y, w, h = _xywh(box)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    images = [{"id": 1, "file_name": "1.png", "height": HEIGHT, "width": WIDTH}]
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)


@pytest.mark.slow
def test_eval_only_reports_the_ap_of_the_checkpoints_detections(
    tmp_path, converted_tiny, load_converted
):
    """
    Proves that ``--eval-only`` scores the checkpoint's own detections against the dataset's
    annotations with COCO AP, category ids mapped. The ground truth is built from the
    checkpoint's detections (computed here through ``model_zoo``): "red box" is its
    highest-scoring "red box" detection, so that category's AP is 100 at every IoU
    threshold; "cat" is a box no detection overlaps (IoU < 0.25), so its AP is 0. The AP is
    their mean, 50, whatever the random weights. Evaluating other weights (e.g. the random
    initialisation), other pixels, mismatched category ids, or an AP computed wrongly gives
    another number (a sabotaged AP was checked to fail here).
    """
    _, out_dir, _ = converted_tiny
    detections = _detections(load_converted(out_dir), _image())
    red = detections[detections.pred_classes == 0]
    assert len(red) > 0
    red_box = red.pred_boxes.tensor[red.scores.argmax()]
    cat_box = _box_missed_by_every_detection(detections)
    _write_dataset(str(tmp_path), red_box, cat_box)
    config = tmp_path / "eval.py"
    config.write_text(
        EVAL_CONFIG.format(
            converted=str(out_dir / "config.yaml"), repo=REPO, height=HEIGHT, width=WIDTH
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train_net.py"),
            "--config-file",
            str(config),
            "--eval-only",
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    output = tmp_path / "output"
    # metrics.json: the results, unrounded, at iteration 0 (a converted checkpoint).
    (line,) = (output / "metrics.json").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["iteration"] == 0
    assert metrics["bbox/AP-red box"] == pytest.approx(100.0, abs=1e-6)
    assert metrics["bbox/AP-cat"] == pytest.approx(0.0, abs=1e-6)
    for key in ("AP", "AP50", "AP75"):
        assert metrics[f"bbox/{key}"] == pytest.approx(50.0, abs=1e-6), key
    # The dumped detections carry the json's ids; the best "red box" one is the box computed
    # here (the same weights and pixels), in xywh pixels of the image.
    with open(output / "inference" / "coco_instances_results.json") as f:
        dumped = json.load(f)
    assert {d["category_id"] for d in dumped} == {3, 7}
    best = max((d for d in dumped if d["category_id"] == 3), key=lambda d: d["score"])
    assert best["bbox"] == pytest.approx(_xywh(red_box), abs=0.01)
    assert best["score"] == pytest.approx(float(red.scores.max()), abs=1e-4)
