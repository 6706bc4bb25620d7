"""Evaluators: COCO / LVIS AP of hand-made predictions, REC accuracy and P@k."""

import contextlib
import io
import json
import math
import uuid

import detectron2.utils.comm as comm
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_lvis_instances
from detectron2.evaluation import print_csv_format
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding_dino.evaluation import (
    EVALUATOR_TYPES,
    RECEvaluator,
    ZeroShotDetectionEvaluator,
    ZeroShotLVISEvaluator,
    build_evaluator,
    keep_topk_per_class,
    register_evaluator_type,
)

# --------------------------------------------------------------------------- fixtures

# Non-contiguous category ids exercise the contiguous <-> dataset id mapping.
COCO_CATEGORIES = [
    {"id": 1, "name": "cat"},
    {"id": 3, "name": "dog"},
    {"id": 7, "name": "traffic light"},
]
COCO_IMAGES = [
    {"id": 1, "file_name": "1.jpg", "height": 480, "width": 640},
    {"id": 2, "file_name": "2.jpg", "height": 480, "width": 640},
    {"id": 5, "file_name": "5.jpg", "height": 240, "width": 320},
]
# (image_id, category_id, xywh): small, medium and large boxes
COCO_BOXES = [
    (1, 1, [10, 10, 100, 80]),
    (1, 3, [200, 150, 150, 120]),
    (2, 1, [50, 60, 20, 20]),
    (2, 7, [300, 100, 40, 90]),
    (5, 3, [0, 0, 160, 120]),
    (5, 1, [100, 100, 30, 30]),
]
CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def _unique_name(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _registered(name):
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def coco_dataset(tmp_path):
    annotations = [
        {
            "id": i + 1,
            "image_id": img,
            "category_id": cat,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": 0,
        }
        for i, (img, cat, box) in enumerate(COCO_BOXES)
    ]
    gt = {"images": COCO_IMAGES, "annotations": annotations, "categories": COCO_CATEGORIES}
    json_file = tmp_path / "tiny_coco.json"
    json_file.write_text(json.dumps(gt))
    name = _unique_name("tiny_coco")
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    with _registered(name):
        yield name, str(json_file)


LVIS_CATEGORIES = [
    {"id": 1, "name": "apple", "frequency": "r", "synonyms": ["apple"]},
    {"id": 2, "name": "bear", "frequency": "c", "synonyms": ["bear"]},
    {"id": 3, "name": "cup", "frequency": "f", "synonyms": ["cup"]},
]
LVIS_IMAGES = [
    {
        "id": 1,
        "file_name": "1.jpg",
        "height": 480,
        "width": 640,
        "neg_category_ids": [3],
        "not_exhaustive_category_ids": [],
    },
    {
        "id": 2,
        "file_name": "2.jpg",
        "height": 480,
        "width": 640,
        "neg_category_ids": [1],
        "not_exhaustive_category_ids": [],
    },
]
LVIS_BOXES = [
    (1, 1, [10, 10, 50, 50]),
    (1, 2, [100, 100, 200, 150]),
    (2, 2, [20, 30, 100, 100]),
    (2, 3, [200, 200, 40, 60]),
]


@pytest.fixture
def lvis_dataset(tmp_path):
    annotations = [
        {"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3]}
        for i, (img, cat, box) in enumerate(LVIS_BOXES)
    ]
    gt = {"images": LVIS_IMAGES, "annotations": annotations, "categories": LVIS_CATEGORIES}
    json_file = tmp_path / "tiny_lvis.json"
    json_file.write_text(json.dumps(gt))
    name = _unique_name("tiny_lvis")
    register_lvis_instances(
        name, {"thing_classes": [c["name"] for c in LVIS_CATEGORIES]}, str(json_file), str(tmp_path)
    )
    with _registered(name):
        yield name


# --------------------------------------------------------------------------- helpers


def _instances(image_size, dets):
    """dets: list of (xyxy, score, contiguous class)."""
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[2] for d in dets], dtype=torch.int64)
    inst.token_scores = torch.zeros(len(dets), 256)
    return inst


def _xyxy(xywh, dx=0.0, dy=0.0):
    x, y, w, h = xywh
    return [x + dx, y + dy, x + w + dx, y + h + dy]


def _run(evaluator, images, dets_per_image):
    """dets_per_image: image_id -> list of (xyxy, score, contiguous class)."""
    evaluator.reset()
    for img in images:
        inputs = [{"image_id": img["id"], "height": img["height"], "width": img["width"]}]
        inst = _instances((img["height"], img["width"]), dets_per_image.get(img["id"], []))
        evaluator.process(inputs, [{"instances": inst, "phrases": ["x"] * len(inst)}])
    return evaluator.evaluate()


def _coco_reference(json_file, dets_per_image, max_dets):
    """AP numbers computed with pycocotools' COCOeval directly (percent)."""
    results = [
        {
            "image_id": img_id,
            "category_id": COCO_CATEGORIES[cls]["id"],
            "bbox": BoxMode.convert(box, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            "score": score,
        }
        for img_id, dets in dets_per_image.items()
        for box, score, cls in dets
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.params.maxDets = [1, 10, max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"]  # [iou, recall, class, area, maxdets]

    def mean(p):
        p = p[p > -1]
        return float(np.mean(p) * 100) if p.size else float("nan")

    ref = {
        "AP": mean(precision[:, :, :, 0, -1]),
        "AP50": mean(precision[0, :, :, 0, -1]),
        "AP75": mean(precision[5, :, :, 0, -1]),
        "APs": mean(precision[:, :, :, 1, -1]),
        "APm": mean(precision[:, :, :, 2, -1]),
        "APl": mean(precision[:, :, :, 3, -1]),
    }
    for k, cat in enumerate(COCO_CATEGORIES):
        ref["AP-" + cat["name"]] = mean(precision[:, :, k, 0, -1])
    return ref


def _assert_close(results, expected, tol=0.01):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(value, abs=tol), key


def _perfect_coco():
    dets = {}
    for i, (img, cat, box) in enumerate(COCO_BOXES):
        dets.setdefault(img, []).append((_xyxy(box), 0.9 - 0.01 * i, CONTIGUOUS[cat]))
    return dets


# --------------------------------------------------------------------------- COCO


def test_coco_perfect_predictions_give_100(coco_dataset):
    name, _ = coco_dataset
    results = _run(
        ZeroShotDetectionEvaluator(name, distributed=False), COCO_IMAGES, _perfect_coco()
    )
    bbox = results["bbox"]
    for key in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AP-cat", "AP-dog", "AP-traffic light"]:
        assert bbox[key] == pytest.approx(100.0), key
    print_csv_format(results)  # detectron2's log format accepts the dict


def test_coco_builds_category_mapping_without_loading_dataset(coco_dataset):
    name, _ = coco_dataset
    meta = MetadataCatalog.get(name)
    assert meta.get("thing_dataset_id_to_contiguous_id") is None
    ZeroShotDetectionEvaluator(name, distributed=False)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2}
    assert meta.thing_classes == ["cat", "dog", "traffic light"]
    # the same values load_coco_json sets: loading afterwards does not conflict
    DatasetCatalog.get(name)
    assert meta.thing_classes == ["cat", "dog", "traffic light"]


def test_coco_shifted_and_missing_boxes_match_pycocotools(coco_dataset):
    name, json_file = coco_dataset
    dets = {
        # cat: exact; dog: shifted by 30 px (IoU ~0.6); false positive dog
        1: [
            (_xyxy([10, 10, 100, 80]), 0.9, 0),
            (_xyxy([200, 150, 150, 120], dx=30), 0.8, 1),
            (_xyxy([400, 300, 50, 50]), 0.85, 1),
        ],
        # small cat shifted by 4 px (IoU ~0.6); traffic light missing
        2: [(_xyxy([50, 60, 20, 20], dx=4), 0.7, 0)],
        # dog exact with low score, cat shifted a little, duplicate cat
        5: [
            (_xyxy([0, 0, 160, 120]), 0.3, 1),
            (_xyxy([100, 100, 30, 30], dx=2, dy=2), 0.6, 0),
            (_xyxy([100, 100, 30, 30], dx=3), 0.5, 0),
        ],
    }
    results = _run(ZeroShotDetectionEvaluator(name, distributed=False), COCO_IMAGES, dets)
    expected = _coco_reference(json_file, dets, max_dets=300)
    assert expected["AP"] < 90.0  # the case is not trivially perfect
    assert expected["AP-traffic light"] == 0.0
    _assert_close(results["bbox"], expected)


def test_coco_keeps_top_max_dets_per_image(coco_dataset):
    name, json_file = coco_dataset
    dets = _perfect_coco()
    # image 1: 300 confident false "traffic light" boxes push its true boxes out of the top 300
    fps = [
        ([500.0, 400.0 + 0.1 * i, 520.0, 420.0 + 0.1 * i], 0.99 - 1e-4 * i, 2) for i in range(300)
    ]
    dets[1] = fps + [(box, 0.5, cls) for box, _, cls in dets[1]]

    capped = _run(ZeroShotDetectionEvaluator(name, distributed=False), COCO_IMAGES, dets)
    top300 = dict(dets)
    top300[1] = fps
    _assert_close(capped["bbox"], _coco_reference(json_file, top300, max_dets=300))

    uncapped = _run(
        ZeroShotDetectionEvaluator(name, distributed=False, max_dets_per_image=302),
        COCO_IMAGES,
        dets,
    )
    _assert_close(uncapped["bbox"], _coco_reference(json_file, dets, max_dets=302))
    assert uncapped["bbox"]["AP-cat"] == pytest.approx(100.0)
    assert capped["bbox"]["AP-cat"] < 80.0


def test_coco_rejects_out_of_range_class(coco_dataset):
    name, _ = coco_dataset
    evaluator = ZeroShotDetectionEvaluator(name, distributed=False)
    evaluator.reset()
    inst = _instances((480, 640), [([0, 0, 10, 10], 0.5, 3)])
    with pytest.raises(ValueError, match=r"image_id=1 .*\[3, 3\].*3 categories"):
        evaluator.process([{"image_id": 1}], [{"instances": inst}])
    with pytest.raises(ValueError, match="no 'instances'"):
        evaluator.process([{"image_id": 1}], [{"phrases": []}])


def test_non_main_process_returns_empty_dict(coco_dataset, monkeypatch):
    name, _ = coco_dataset
    coco = ZeroShotDetectionEvaluator(name, distributed=True)
    rec = RECEvaluator(name, distributed=True)
    coco.reset()
    rec.reset()
    inst = _instances((480, 640), [([0, 0, 10, 10], 0.5, 0)])
    coco.process([{"image_id": 1}], [{"instances": inst}])
    rec.process([{"image_id": 1, "gt_box": [0, 0, 10, 10]}], [{"instances": inst}])
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert coco.evaluate() == {}
    assert rec.evaluate() == {}


# --------------------------------------------------------------------------- LVIS


def _perfect_lvis(score_of=lambda i: 0.9 - 0.1 * i):
    dets = {}
    for i, (img, cat, box) in enumerate(LVIS_BOXES):
        dets.setdefault(img, []).append((_xyxy(box), score_of(i), cat - 1))
    return dets


def test_lvis_perfect_predictions_give_100(lvis_dataset):
    evaluator = ZeroShotLVISEvaluator(lvis_dataset, distributed=False)
    results = _run(evaluator, LVIS_IMAGES, _perfect_lvis())
    for key in ["AP", "AP50", "AP75", "APr", "APc", "APf"]:
        assert results["bbox"][key] == pytest.approx(100.0), key
    assert math.isnan(results["bbox"]["APs"])  # no small boxes: NaN, not -100
    print_csv_format(results)


def test_lvis_fixed_ap_has_no_per_image_limit(lvis_dataset):
    dets = _perfect_lvis()
    standard = _run(
        ZeroShotLVISEvaluator(lvis_dataset, distributed=False, max_dets_per_image=1),
        LVIS_IMAGES,
        dets,
    )
    # one box per image: image 1 loses its bear, image 2 its cup
    assert standard["bbox"]["AP"] < 90.0
    fixed = _run(
        ZeroShotLVISEvaluator(lvis_dataset, distributed=False, max_dets_per_image=1, fixed_ap=True),
        LVIS_IMAGES,
        dets,
    )
    assert fixed["bbox"]["AP"] == pytest.approx(100.0)


def test_lvis_fixed_ap_keeps_topk_per_class(lvis_dataset):
    # bear has two instances; with a budget of one per class only the best-scored one counts:
    # recall 0.5 at precision 1 -> 51 of the 101 recall points -> AP 100 * 51 / 101
    evaluator = ZeroShotLVISEvaluator(
        lvis_dataset, distributed=False, fixed_ap=True, topk_per_class=1
    )
    results = _run(evaluator, LVIS_IMAGES, _perfect_lvis())["bbox"]
    assert results["APc"] == pytest.approx(100 * 51 / 101, abs=0.01)
    assert results["APr"] == pytest.approx(100.0)
    assert results["APf"] == pytest.approx(100.0)
    assert results["AP"] == pytest.approx((200 + 100 * 51 / 101) / 3, abs=0.01)


def test_lvis_fixed_ap_topk_is_global_across_ranks(lvis_dataset, monkeypatch):
    # rank 0 sees image 1, a fake rank 1 image 2; each holds one bear, the budget is one bear
    dets = _perfect_lvis()
    image2 = instances_to_coco_json(_instances((480, 640), dets[2]), 2)
    monkeypatch.setattr(
        comm, "gather", lambda data, dst=0: [data, [{"image_id": 2, "instances": image2}]]
    )
    evaluator = ZeroShotLVISEvaluator(lvis_dataset, fixed_ap=True, topk_per_class=1)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": _instances((480, 640), dets[1])}])
    results = evaluator.evaluate()["bbox"]
    assert results["APc"] == pytest.approx(100 * 51 / 101, abs=0.01)
    assert results["APf"] == pytest.approx(100.0)


def test_keep_topk_per_class():
    preds = [
        {
            "image_id": 1,
            "instances": [
                {"category_id": 0, "score": 0.9},
                {"category_id": 1, "score": 0.2},
            ],
        },
        {
            "image_id": 2,
            "instances": [
                {"category_id": 0, "score": 0.95},
                {"category_id": 0, "score": 0.1},
                {"category_id": 1, "score": 0.3},
            ],
        },
    ]
    kept = keep_topk_per_class(preds, 2)
    assert [d["score"] for d in kept[0]["instances"]] == [0.9, 0.2]
    assert [d["score"] for d in kept[1]["instances"]] == [0.95, 0.3]
    with pytest.raises(ValueError, match="k must be positive"):
        keep_topk_per_class(preds, 0)


# --------------------------------------------------------------------------- REC

GT = [0.0, 0.0, 10.0, 10.0]
FAR = [[100.0 + 20 * i, 100.0, 110.0 + 20 * i, 110.0] for i in range(10)]


def _rec_output(boxes_scores):
    inst = Instances((480, 640))
    inst.pred_boxes = Boxes(torch.tensor([b for b, _ in boxes_scores]).reshape(-1, 4))
    inst.scores = torch.tensor([s for _, s in boxes_scores], dtype=torch.float32)
    return {"instances": inst, "phrases": ["x"] * len(boxes_scores)}


def _rec_cases():
    iou_050 = [0.0, 0.0, 10.0, 5.0]  # IoU exactly 0.5
    iou_049 = [0.0, 0.0, 10.0, 4.9]  # IoU 0.49
    iou_060 = [0.0, 0.0, 10.0, 6.0]  # IoU 0.6
    far_scores = [(FAR[i], 0.9 - 0.05 * i) for i in range(9)]
    return [
        # A: top-1 at IoU 0.5 counts; ground truth given as a dataset annotation (XYWH)
        (
            {
                "image_id": 1,
                "split": "val",
                "annotations": [{"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS}],
            },
            _rec_output([(iou_050, 0.9), (FAR[0], 0.1)]),
        ),
        # B: top-1 at IoU 0.49 misses; the 3rd box (IoU 0.6) is within P@5
        (
            {"image_id": 2, "split": "val", "gt_box": GT},
            _rec_output([(iou_049, 0.9), (FAR[0], 0.8), (iou_060, 0.7)]),
        ),
        # C: the IoU-0.6 box has the 7th score (listed last): only P@10
        (
            {"image_id": 3, "split": "testA", "gt_box": GT},
            _rec_output(far_scores[:6] + [(FAR[8], 0.01), (iou_060, 0.55)]),
        ),
        # D: no prediction at all: a miss everywhere
        ({"image_id": 4, "split": "testA", "gt_box": GT}, _rec_output([])),
        # E: unsorted list; the good box is listed first but ranks 2nd
        (
            {"image_id": 5, "split": "testA", "gt_box": GT},
            _rec_output([(iou_060, 0.3), (FAR[1], 0.95)]),
        ),
    ]


def test_rec_accuracy_and_precision_at_k(tmp_path):
    evaluator = RECEvaluator("tiny_refcoco", output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    for inp, out in _rec_cases():
        evaluator.process([inp], [out])
    results = evaluator.evaluate()
    rec = results["rec"]
    expected = {
        "Acc@0.5": 20.0,
        "P@1": 20.0,
        "P@5": 60.0,
        "P@10": 80.0,
        "val/Acc@0.5": 50.0,
        "val/P@1": 50.0,
        "val/P@5": 100.0,
        "val/P@10": 100.0,
        "testA/Acc@0.5": 0.0,
        "testA/P@1": 0.0,
        "testA/P@5": 100 / 3,
        "testA/P@10": 200 / 3,
    }
    assert set(rec) == set(expected)
    _assert_close(rec, expected, tol=1e-6)
    saved = json.loads((tmp_path / "rec_predictions.json").read_text())
    assert len(saved) == 5 and saved[0]["ious"][0] == 0.5
    print_csv_format(results)


def test_rec_errors_name_the_problem():
    evaluator = RECEvaluator(distributed=False)
    evaluator.reset()
    with pytest.raises(ValueError, match="image_id=7 carries no ground-truth box"):
        evaluator.process([{"image_id": 7}], [_rec_output([(GT, 1.0)])])
    with pytest.raises(ValueError, match="4 numbers, got 3"):
        evaluator.process([{"image_id": 7, "gt_box": [0, 0, 1]}], [_rec_output([(GT, 1.0)])])
    with pytest.raises(ValueError, match="topk"):
        RECEvaluator(topk=(0, 5))


# --------------------------------------------------------------------------- factory


def test_build_evaluator_by_metadata(coco_dataset, lvis_dataset):
    name, _ = coco_dataset
    assert type(build_evaluator(name)) is ZeroShotDetectionEvaluator
    assert type(build_evaluator(lvis_dataset, fixed_ap=True)) is ZeroShotLVISEvaluator

    rec_name = _unique_name("tiny_rec")
    DatasetCatalog.register(rec_name, lambda: [])
    MetadataCatalog.get(rec_name).set(evaluator_type="rec")
    none_name = _unique_name("no_type")
    DatasetCatalog.register(none_name, lambda: [])
    odd_name = _unique_name("odd_type")
    DatasetCatalog.register(odd_name, lambda: [])
    MetadataCatalog.get(odd_name).set(evaluator_type="cityscapes")
    with _registered(rec_name), _registered(none_name), _registered(odd_name):
        assert type(build_evaluator(rec_name)) is RECEvaluator
        with pytest.raises(ValueError, match=f"'{none_name}' has no metadata.evaluator_type"):
            build_evaluator(none_name)
        with pytest.raises(ValueError, match="'cityscapes', which has no evaluator"):
            build_evaluator(odd_name)

        @register_evaluator_type("cityscapes")
        class _Custom(RECEvaluator):
            pass

        try:
            assert type(build_evaluator(odd_name)) is _Custom
            with pytest.raises(KeyError, match="already registered"):
                register_evaluator_type("cityscapes")(RECEvaluator)
        finally:
            EVALUATOR_TYPES.pop("cityscapes")
