"""Mask (segm) AP beside box AP in the zero-shot COCO evaluator, on a case computed by hand."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from grounding_dino.data.shapes.splits import mask_rle
from grounding_dino.evaluation import build_evaluator

SIZE = 32
NAME = "segm_by_hand"


def _square():
    """The ground truth of both images: a 10x10 square at the top left (area 100)."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:10, :10] = True
    return mask


def _minus(mask, pixels: int):
    """``mask`` without its last ``pixels`` pixels (row-major): IoU (100 - pixels) / 100."""
    out = mask.copy()
    ys, xs = np.nonzero(out)
    out[ys[len(ys) - pixels :], xs[len(xs) - pixels :]] = False
    return out


@pytest.fixture
def dataset(tmp_path):
    gt = _square()
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2)]
    annotations = [
        {
            "id": i,
            "image_id": i,
            "category_id": 1,
            "bbox": [0.0, 0.0, 10.0, 10.0],
            "area": 100.0,
            "segmentation": mask_rle(gt),
            "iscrowd": 0,
        }
        for i in (1, 2)
    ]
    path = tmp_path / "gt.json"
    path.write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
        )
    )
    if NAME in DatasetCatalog.list():
        DatasetCatalog.remove(NAME)
        MetadataCatalog.remove(NAME)
    register_coco_instances(NAME, {}, str(path), str(tmp_path))
    yield str(tmp_path)
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _instances(scores, masks):
    """Detections whose boxes all equal the ground truth box (box AP 100), with ``masks``."""
    n = len(scores)
    instances = Instances((SIZE, SIZE))
    instances.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * n))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.zeros(n, dtype=torch.long)
    if masks is not None:
        instances.pred_masks = torch.from_numpy(np.stack(masks))
    return instances


@pytest.mark.parametrize("through", ["pred_masks", "mask_instances"])
def test_segm_ap_by_hand(dataset, through):
    """
    Image 1: p1 (score 0.9) with mask IoU 0.87. Image 2: p2 (0.8) with IoU 0.62 and p3 (0.7)
    with the exact mask (IoU 1). Two ground truth masks; every box equals its ground truth box,
    so box AP is 100 and only the masks lower the mask AP. COCO matches greedily by score and
    takes precision at the 101 recall points r = 0, 0.01, ..., 1 (the envelope from the right):

    * IoU threshold t in {0.50, 0.55, 0.60}: p1 TP, p2 TP, p3 FP (its object is taken):
      recall 0.5, 1, 1 at precision 1, 1, 2/3 -> AP 1.
    * t in {0.65, ..., 0.85} (5): p1 TP, p2 FP, p3 TP: recall 0.5, 0.5, 1, precision 1, 1/2,
      2/3 -> precision 1 at the 51 points r <= 0.5, 2/3 at the 50 others: AP = (51 + 50 * 2/3)
      / 101.
    * t in {0.90, 0.95}: p1 FP, p2 FP, p3 TP: recall 0, 0, 0.5, precision 0, 0, 1/3 -> 1/3
      at the 51 points r <= 0.5: AP = 17 / 101.

    AP = (3 + 5 (51 + 100/3) / 101 + 2 * 17/101) / 10 = 75.116%; AP50 = 100; AP75 = 83.498%.
    """
    gt = _square()
    masks = {1: [_minus(gt, 13)], 2: [_minus(gt, 38), gt]}
    scores = {1: [0.9], 2: [0.8, 0.7]}
    evaluator = build_evaluator(NAME, output_dir=dataset)
    evaluator.reset()
    for image_id in (1, 2):
        if through == "pred_masks":
            output = {"instances": _instances(scores[image_id], masks[image_id])}
        else:  # InferenceWithMasks' output: all detections, and the best ones with masks
            extra = _instances(scores[image_id] + [0.01], None)
            extra.pred_boxes.tensor[-1] = torch.tensor([20.0, 20.0, 30.0, 30.0])  # a miss
            output = {
                "instances": extra,
                "mask_instances": _instances(scores[image_id], masks[image_id]),
            }
        evaluator.process([{"image_id": image_id}], [output])
    results = evaluator.evaluate()
    expected_ap = (3 + 5 * (51 + 50 * 2 / 3) / 101 + 2 * 17 / 101) / 10 * 100
    assert results["segm"]["AP"] == pytest.approx(expected_ap, abs=1e-6)
    assert expected_ap == pytest.approx(75.116, abs=1e-3)
    assert results["segm"]["AP50"] == pytest.approx(100.0)
    assert results["segm"]["AP75"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100, abs=1e-6)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    with open(f"{dataset}/coco_segm_results.json") as f:
        assert len(json.load(f)) == 3


def test_segm_needs_gt_masks_and_masks_everywhere(dataset, tmp_path):
    gt = _square()
    evaluator = build_evaluator(NAME)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": _instances([0.9], [gt])}])
    evaluator.process([{"image_id": 2}], [{"instances": _instances([0.9], None)}])
    with pytest.raises(ValueError, match="1 of 2 images have masks"):
        evaluator.evaluate()
    # A json without segmentation: a clear error naming it.
    data = json.load(open(f"{dataset}/gt.json"))
    for ann in data["annotations"]:
        del ann["segmentation"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    register_coco_instances(NAME + "_bare", {}, str(bare), str(tmp_path))
    try:
        evaluator = build_evaluator(NAME + "_bare")
        evaluator.reset()
        for image_id in (1, 2):
            evaluator.process([{"image_id": image_id}], [{"instances": _instances([0.9], [gt])}])
        with pytest.raises(ValueError, match="bare.json.*no 'segmentation'"):
            evaluator.evaluate()
    finally:
        DatasetCatalog.remove(NAME + "_bare")
        MetadataCatalog.remove(NAME + "_bare")


@pytest.mark.slow
def test_train_net_eval_only_with_sam_reports_segm(tmp_path, converted_tiny):
    """``train_net.py --eval-only --sam DIR``: the COCO evaluator reports ``segm`` beside
    ``bbox`` in metrics.json, and the segm AP is pycocotools' on the dumped masks."""
    import os
    import subprocess
    import sys

    import cv2
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sam_reference import tiny_segmenter_folder
    from test_eval_only import EVAL_CONFIG, HEIGHT, REPO, WIDTH, _image

    _, out_dir, _ = converted_tiny
    _, _, sam_dir = tiny_segmenter_folder("sam", tmp_path / "sam")
    os.makedirs(tmp_path / "images")
    cv2.imwrite(str(tmp_path / "images" / "1.png"), cv2.cvtColor(_image(), cv2.COLOR_RGB2BGR))
    red = np.zeros((HEIGHT, WIDTH), bool)
    red[10:61, 10:51] = True  # the image's red rectangle
    categories = [{"id": 3, "name": "red box"}, {"id": 7, "name": "cat"}]
    annotation = dict(id=1, image_id=1, category_id=3, bbox=[10.0, 10.0, 41.0, 51.0])
    annotation.update(area=float(red.sum()), segmentation=mask_rle(red), iscrowd=0)
    images = [{"id": 1, "file_name": "1.png", "height": HEIGHT, "width": WIDTH}]
    gt = {"images": images, "annotations": [annotation], "categories": categories}
    (tmp_path / "coco.json").write_text(json.dumps(gt))
    config = tmp_path / "eval.py"
    config.write_text(
        EVAL_CONFIG.format(
            converted=str(out_dir / "config.yaml"), repo=REPO, height=HEIGHT, width=WIDTH
        )
    )
    command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", str(config)]
    # Flags before the key=value overrides (argparse's REMAINDER takes all that follows).
    command += ["--eval-only", "--sam", sam_dir, f"train.init_checkpoint={out_dir / 'model.pth'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (line,) = (tmp_path / "output" / "metrics.json").read_text().splitlines()
    metrics = json.loads(line)
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    dumped = json.loads((tmp_path / "output" / "inference" / "coco_segm_results.json").read_text())
    assert dumped and all(d["segmentation"]["size"] == [HEIGHT, WIDTH] for d in dumped)
    assert len(dumped) <= 100  # masks for the 100 best boxes of the image
    coco = COCO(str(tmp_path / "coco.json"))
    evaluation = COCOeval(coco, coco.loadRes([{**d, "bbox": []} for d in dumped]), "segm")
    evaluation.params.maxDets = [1, 10, 300]
    evaluation.evaluate()
    evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    expected = 100.0 * float(precision[precision > -1].mean())
    assert metrics["segm/AP"] == pytest.approx(expected, abs=1e-6)
