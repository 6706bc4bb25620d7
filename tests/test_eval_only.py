"""``train_net.py --eval-only`` on a converted checkpoint and a small registered dataset."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
dataloader.test.mapper.augmentations.min_size = 96
dataloader.test.mapper.augmentations.max_size = 128
dataloader.test.num_workers = 0
model.box_threshold = 0.0
train.output_dir = os.path.join(HERE, "output")
"""


def _write_dataset(root):
    os.makedirs(os.path.join(root, "images"))
    images, annotations = [], []
    for image_id in (1, 2):
        image = np.full((96, 128, 3), 180, np.uint8)
        cv2.rectangle(image, (10, 10), (50, 60), (0, 0, 200), -1)
        cv2.imwrite(os.path.join(root, "images", f"{image_id}.png"), image)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 96, "width": 128})
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [10, 10, 41, 51],
                "area": 41 * 51,
                "iscrowd": 0,
            }
        )
    categories = [{"id": 1, "name": "red box"}, {"id": 2, "name": "cat"}]
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


@pytest.mark.slow
def test_eval_only_on_a_converted_model_prints_the_ap_table(tmp_path, converted_tiny):
    _, out_dir, _ = converted_tiny
    _write_dataset(str(tmp_path))
    config = tmp_path / "eval.py"
    config.write_text(EVAL_CONFIG.format(converted=str(out_dir / "config.yaml"), repo=REPO))
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
    assert "Evaluation results for bbox" in log
    for column in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert column in log
    assert "AP-red box" in log or "red box" in log
