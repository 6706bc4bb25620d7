"""
Evaluation does not depend on the display knobs: ``train_net.py``'s evaluation (periodic and
``--eval-only``) gives the same COCO AP and REC Acc@0.5 at ``model.box_threshold=0`` and
``0.35``, and writes its results to ``metrics.json``.

The ground truth is made from the model's own predictions, so the expected results are known
without the code under test: every ground-truth box is a box the model predicts, and some of
them score below 0.35. A REC expression's box is its top-1 box, so Acc@0.5 is 100 when the
top-1 box is scored whatever its score; COCO AP counts the low-scoring boxes too.
"""

import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BoxMode
from torch import nn

from grounding_dino import InferenceSettings
from grounding_dino.engine import InferenceWithSettings, evaluation_settings
from grounding_dino.engine.evaluation import EVAL_MAX_DETECTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ["red square", "blue circle"]
DISPLAY_THRESHOLD = 0.35

# A small Grounding DINO (the packaged shapes_tiny model at 128 px) on a fixture dataset with
# two registered names: "<NAME>" (COCO detection, coco.json) and "<NAME>_rec" (REC, rec.json).
TINY_EVAL_CONFIG = """
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from grounding_dino.model_zoo import get_config

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "gd_eval_fixture_" + str(abs(hash(HERE)) % 10**8)
CATEGORIES = {categories!r}


def _load_rec():
    with open(os.path.join(HERE, "rec.json")) as f:
        records = json.load(f)
    for record in records:
        record["file_name"] = os.path.join(HERE, "images", record["file_name"])
    return records


if NAME not in DatasetCatalog.list():
    register_coco_instances(
        NAME, {{}}, os.path.join(HERE, "coco.json"), os.path.join(HERE, "images")
    )
    DatasetCatalog.register(NAME + "_rec", _load_rec)
    MetadataCatalog.get(NAME + "_rec").set(evaluator_type="rec", thing_classes=list(CATEGORIES))

_base = get_config("shapes_tiny.py")
model, train, dataloader = _base.model, _base.train, _base.dataloader
optimizer, lr_multiplier = _base.optimizer, _base.lr_multiplier
# Best scores spread around the display threshold (0.35) at initialisation.
model.head.bias_init = -3.0
model.query_selector.num_queries = 30
dataloader.train.dataset.names = NAME
dataloader.train.mapper.thing_classes.name = NAME
dataloader.train.total_batch_size = 2
dataloader.test.dataset.names = NAME
dataloader.test.mapper.augmentations.min_size = 128
dataloader.test.mapper.augmentations.max_size = 128
dataloader.test.batch_size = 4
train.output_dir = os.path.join(HERE, "output")
train.device = "cpu"
train.max_iter = 1
train.eval_period = 0
train.log_period = 1
train.checkpointer.period = 1000
train.init_partial = False
optimizer.lr = 1e-12  # a training step leaves the weights as they are (below float32 resolution)
"""


def write_images(root: str, count: int = 4):
    """
    ``count`` 96x128 pictures with a red square and a blue circle. Returns the COCO images and
    annotations (the drawn shapes).
    """
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for image_id in range(1, count + 1):
        image = np.full((96, 128, 3), 200, np.uint8)
        x, y = (int(v) for v in rng.integers(5, 45, 2))
        cv2.rectangle(image, (x, y), (x + 29, y + 29), (0, 0, 220), -1)
        cv2.circle(image, (x + 60, 50), 15, (220, 0, 0), -1)
        for category, box in ((1, [x, y, 30, 30]), (2, [x + 45, 35, 31, 31])):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id}.png"
        cv2.imwrite(os.path.join(root, "images", file_name), image)
        images.append({"id": image_id, "file_name": file_name, "height": 96, "width": 128})
    return images, annotations


def write_coco(root: str, images, annotations) -> None:
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def write_tiny_setup(root: str) -> str:
    """Images, their coco.json, an empty rec.json and the config; returns the config's path."""
    images, annotations = write_images(root)
    write_coco(root, images, annotations)
    with open(os.path.join(root, "rec.json"), "w") as f:
        json.dump([], f)
    path = os.path.join(root, "tiny_eval.py")
    with open(path, "w") as f:
        f.write(TINY_EVAL_CONFIG.format(categories=CATEGORIES))
    return path


def dataset_name(config: str) -> str:
    return LazyConfig.load(config).dataloader.test.dataset.names


def build_and_save(config: str, path: str, *overrides: str) -> nn.Module:
    """The config's model (seed 0), saved as a training checkpoint would be ({"model": ...})."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), list(overrides))
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    torch.save({"model": model.state_dict()}, path)
    return model


def load_train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(config: str, *opts: str):
    """``train_net.main`` in this process with ``opts`` (flags, then overrides)."""
    train_net = load_train_net()
    args = train_net.default_argument_parser().parse_args(["--config-file", config, *opts])
    return train_net.main(args)


def read_metrics(output_dir: str):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- fixture with known results
def _predict(model, config: str, name: str):
    """The model's evaluation outputs (no threshold, 300 boxes) on dataset ``name``."""
    cfg = LazyConfig.load(config)
    cfg.dataloader.test.dataset.names = name
    outputs = {}
    evaluated = InferenceWithSettings(model, evaluation_settings(model))
    with torch.no_grad():
        for inputs in instantiate(cfg.dataloader.test):
            for record, output in zip(inputs, evaluated(inputs)):
                outputs[record["image_id"]] = output["instances"]
    return outputs


def _xywh(box) -> list:
    return BoxMode.convert([float(v) for v in box], BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """
    The fixture dataset whose ground truth is the model's own predictions: per image and
    category, the category's best box (COCO), and per (image, category name) expression, its
    top-1 box (REC). Returns (config, checkpoint, {"scores": ground-truth boxes' scores}).
    """
    root = str(tmp_path_factory.mktemp("eval_threshold"))
    config = write_tiny_setup(root)
    name = dataset_name(config)
    checkpoint = os.path.join(root, "model.pth")
    model = build_and_save(config, checkpoint)

    images = json.load(open(os.path.join(root, "coco.json")))["images"]
    annotations, det_scores = [], []
    for image_id, instances in _predict(model, config, name).items():
        for category in range(len(CATEGORIES)):
            mine = (instances.pred_classes == category).nonzero().flatten()
            best = int(mine[instances.scores[mine].argmax()])
            x, y, w, h = _xywh(instances.pred_boxes.tensor[best])
            det_scores.append(float(instances.scores[best]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    write_coco(root, images, annotations)

    # REC: one expression per (image, category name), the top-1 box as its ground truth.
    records = [
        {
            "file_name": image["file_name"],
            "height": image["height"],
            "width": image["width"],
            "image_id": image["id"] * 10 + k,
            "caption": caption,
            "task": "rec",
            "annotations": [
                {
                    "bbox": [0, 0, 1, 1],
                    "bbox_mode": int(BoxMode.XYWH_ABS),
                    "phrase_id": 0,
                    "category_id": k,
                }
            ],
        }
        for image in images
        for k, caption in enumerate(CATEGORIES)
    ]
    for record in records:
        record["annotations"][0]["tokens_positive"] = [[0, len(record["caption"])]]
    rec_path = os.path.join(root, "rec.json")
    with open(rec_path, "w") as f:
        json.dump(records, f)
    rec_scores = []
    predictions = _predict(model, config, name + "_rec")
    for record in records:
        instances = predictions[record["image_id"]]
        top = int(instances.scores.argmax())
        record["annotations"][0]["bbox"] = _xywh(instances.pred_boxes.tensor[top])
        rec_scores.append(float(instances.scores[top]))
    with open(rec_path, "w") as f:
        json.dump(records, f)
    return config, checkpoint, {"det": det_scores, "rec": rec_scores}


def test_fixture_straddles_the_display_threshold(known):
    """Precondition of the tests below: some ground-truth boxes score under 0.35, some over."""
    _, _, scores = known
    for kind in ("det", "rec"):
        assert min(scores[kind]) < DISPLAY_THRESHOLD, (kind, scores[kind])
    assert max(scores["det"] + scores["rec"]) > DISPLAY_THRESHOLD, scores


def test_eval_only_results_do_not_depend_on_the_display_threshold(known, tmp_path):
    config, checkpoint, _ = known
    name = dataset_name(config)
    results = {}
    for threshold in (0.0, DISPLAY_THRESHOLD):
        for dataset in (name, name + "_rec"):
            out = str(tmp_path / f"{dataset}_{threshold}")
            results[(dataset, threshold)] = run_main(
                config,
                "--eval-only",
                f"train.init_checkpoint={checkpoint}",
                f"train.output_dir={out}",
                f"model.box_threshold={threshold}",
                f"dataloader.test.dataset.names={dataset}",
            )
            # The results are also in metrics.json, at iteration 0 (no iteration in the file).
            (line,) = read_metrics(out)
            assert line["iteration"] == 0
            key, metric = ("rec", "Acc@0.5") if dataset.endswith("_rec") else ("bbox", "AP")
            assert line[f"{key}/{metric}"] == pytest.approx(
                results[(dataset, threshold)][key][metric]
            )

    # REC: every expression's ground truth is its top-1 box, whatever its score.
    for threshold in (0.0, DISPLAY_THRESHOLD):
        assert results[(name + "_rec", threshold)]["rec"]["Acc@0.5"] == pytest.approx(100.0)
    # COCO: every ground-truth box is predicted; the same AP at both thresholds.
    low, high = results[(name, 0.0)]["bbox"], results[(name, DISPLAY_THRESHOLD)]["bbox"]
    assert low["AP50"] > 50.0, low
    for metric in ("AP", "AP50", "AP75"):
        assert high[metric] == pytest.approx(low[metric]), (metric, low, high)


def test_periodic_evaluation_ignores_the_threshold_and_writes_metrics_json(known, tmp_path):
    """One training iteration at lr 0, then the evaluation after the last iteration."""
    config, checkpoint, _ = known
    out = str(tmp_path / "train")
    results = run_main(
        config,
        f"train.init_checkpoint={checkpoint}",
        f"train.output_dir={out}",
        f"model.box_threshold={DISPLAY_THRESHOLD}",
        f"dataloader.test.dataset.names={dataset_name(config)}_rec",
    )
    assert results is None  # main returns nothing after training
    lines = [m for m in read_metrics(out) if "rec/Acc@0.5" in m]
    assert len(lines) == 1 and lines[0]["iteration"] == 1, read_metrics(out)
    assert lines[0]["rec/Acc@0.5"] == pytest.approx(100.0)


# ---------------------------------------------------------------- the evaluation's settings
class _RecordsSettings(nn.Module):
    """Stands for a Grounding DINO: configured settings, and an inference that records the
    settings each call passes."""

    def __init__(self, max_detections=100):
        super().__init__()
        self.inference_settings = InferenceSettings(
            box_threshold=0.35, max_detections=max_detections
        )
        self.layer = nn.Linear(1, 1)
        self.calls = []

    def inference(self, inputs, settings=None):
        self.calls.append((settings, self.training))
        return inputs


def test_evaluation_passes_its_settings_and_leaves_the_model_alone_also_through_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _RecordsSettings()
    evaluated = InferenceWithSettings(model, evaluation_settings(model))
    model.train()
    with torch.no_grad():
        assert evaluated(["x"]) == ["x"]
    settings, _ = model.calls[-1]
    assert settings.box_threshold == -math.inf
    assert settings.max_detections == EVAL_MAX_DETECTIONS
    assert model.inference_settings == InferenceSettings(box_threshold=0.35, max_detections=100)

    larger = _RecordsSettings(max_detections=1000)  # a larger budget (LVIS fixed AP) is kept
    assert evaluation_settings(larger).max_detections == 1000

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(_RecordsSettings())
        InferenceWithSettings(wrapped, evaluation_settings(wrapped))(["y"])
        assert wrapped.module.calls[-1][0].box_threshold == -math.inf
        assert wrapped.module.inference_settings.box_threshold == 0.35
    finally:
        dist.destroy_process_group()

    with pytest.raises(AttributeError, match="inference_settings"):
        evaluation_settings(nn.Linear(1, 1))


def test_a_model_refuses_an_assigned_threshold(tiny_model):
    model = tiny_model
    with pytest.raises(AttributeError, match="settings"):
        model.box_threshold = 0.1
    with pytest.raises(AttributeError, match="settings"):
        model.max_detections = 5
    assert model.box_threshold == model.inference_settings.box_threshold


def test_mistyped_train_key_is_an_error_not_a_default(tmp_path):
    """A ``train`` node without ``log_period`` (e.g. written ``log_perod``) is refused."""
    from grounding_dino.checkpoint import GroundingDINOCheckpointer
    from grounding_dino.engine import build_hooks

    train = {
        "checkpointer": {"period": 10},
        "save_last_good": False,
        "eval_period": 0,
        "output_dir": str(tmp_path),
        "max_iter": 10,
        "log_perod": 5,
    }
    checkpointer = GroundingDINOCheckpointer(nn.Linear(1, 1), str(tmp_path))
    with pytest.raises(KeyError, match=r"train\.log_period"):
        build_hooks(train, lr_scheduler=None, checkpointer=checkpointer, eval_function=None)
