"""
Training on a user's own COCO-format dataset, as the README's "Train on your own data" shows:

1. from the command line only: ``configs/finetune_coco_format.py`` with ``dataset.*`` overrides
   (the user config here only swaps in the tiny CPU model of ``shapes_tiny.py``);
2. from a user's config file outside the repository: ``register_coco_instances`` and
   ``dataloader.{train,test}.dataset.names`` on a shipped config, with two gloo workers.

Both run ``train_net.py`` in subprocesses on a tiny synthetic dataset (red squares and blue
circles, category ids 3 and 7). Bad inputs are checked in-process: the same instantiation
``train_net.py`` does.
"""

import json
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
from detectron2.config import LazyConfig, instantiate

from grounding_dino.data.datasets import get_thing_classes, register_coco_format, register_mdetr
from grounding_dino.model_zoo import get_config_file
from grounding_dino.text.tokenizer import local_bert_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Way 1: everything about the data on the command line; only the model is made small.
WAY1_CONFIG = """
from detectron2.config import LazyConfig
from grounding_dino.model_zoo import get_config, get_config_file

_base = LazyConfig.load(get_config_file("finetune_coco_format.py"))
dataset, dataloader, train = _base.dataset, _base.dataloader, _base.train
optimizer, lr_multiplier = _base.optimizer, _base.lr_multiplier
_tiny = get_config("shapes_tiny.py")  # the small CPU model of `make demo`, 256 px
model = _tiny.model
dataloader.train.mapper.augmentations = _tiny.dataloader.train.mapper.augmentations
dataloader.test.mapper.augmentations = _tiny.dataloader.test.mapper.augmentations
"""

# Way 2: the README's user config, on the shipped shapes_tiny.py.
WAY2_CONFIG = """
import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from grounding_dino.model_zoo import get_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
if "own_train" not in DatasetCatalog.list():  # the file may be loaded twice in one process
    register_coco_instances("own_train", {}, f"{DATA}/train.json", f"{DATA}/images")
    register_coco_instances("own_test", {}, f"{DATA}/test.json", f"{DATA}/images")

_cfg = get_config("shapes_tiny.py")
model, train, dataloader = _cfg.model, _cfg.train, _cfg.dataloader
optimizer, lr_multiplier = _cfg.optimizer, _cfg.lr_multiplier
dataloader.train.dataset.names = "own_train"
dataloader.test.dataset.names = "own_test"
"""

CATEGORIES = [{"id": 3, "name": "cls_3"}, {"id": 7, "name": "road_crack"}]
FAST = [
    "train.device=cpu",
    "train.max_iter=3",
    "train.eval_period=0",  # evaluate after the last iteration only
    "train.log_period=1",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.init_checkpoint=",
]


def write_dataset(root, num_train=4, num_test=3):
    """COCO-format train.json / test.json over images/ (160x192 px, one square, one circle)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    image_id = 0
    for split, count in (("train", num_train), ("test", num_test)):
        images, annotations = [], []
        for _ in range(count):
            image_id += 1
            image = np.full((160, 192, 3), 210, np.uint8)
            for cat_id in (3, 7):
                x, y = int(rng.integers(0, 130)), int(rng.integers(0, 100))
                if cat_id == 3:
                    cv2.rectangle(image, (x, y), (x + 49, y + 49), (0, 0, 220), -1)
                else:
                    cv2.circle(image, (x + 25, y + 25), 25, (220, 0, 0), -1)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_id,
                        "bbox": [x, y, 50, 50],
                        "area": 2500,
                        "iscrowd": 0,
                    }
                )
            file_name = f"{image_id:04d}.jpg"
            cv2.imwrite(os.path.join(root, "images", file_name), image)
            images.append({"id": image_id, "file_name": file_name, "height": 160, "width": 192})
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return root


def dataset_overrides(data):
    return [
        f"dataset.train_json={data}/train.json",
        f"dataset.train_images={data}/images",
        f"dataset.test_json={data}/test.json",
        f"dataset.test_images={data}/images",
    ]


def run_train_net(*args, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stdout + result.stderr


def per_category_ap(log):
    """Category names of the last per-category AP table of a log."""
    tables = log.split("Per-category bbox AP:")
    assert len(tables) > 1, log[-3000:]
    rows = [line for line in tables[-1].splitlines()[1:] if line.startswith("|")]
    cells = [c.strip() for row in rows[2:] for c in row.strip("|").split("|")]
    return sorted(cells[0::2]), [float(v) for v in cells[1::2]]


def iterations(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return sorted({json.loads(line)["iteration"] for line in f if '"total_loss"' in line})


@pytest.mark.slow
def test_way1_command_line_trains_evaluates_renamed_and_the_saved_config_reruns(tmp_path):
    data = write_dataset(str(tmp_path / "data"))
    config = tmp_path / "finetune_tiny.py"
    config.write_text(WAY1_CONFIG)
    out = str(tmp_path / "output")
    rc, log = run_train_net(
        "--config-file",
        str(config),
        *dataset_overrides(data),
        'dataset.class_names=[pothole,"road crack"]',
        f"train.output_dir={out}",
        *FAST,
    )
    assert rc == 0, log[-4000:]
    assert iterations(out) == [0, 1, 2]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    # The AP table names the categories as renamed; predictions carry the json's ids.
    names, aps = per_category_ap(log)
    assert names == ["pothole", "road crack"] and len(aps) == 2
    assert "copypaste: Task: bbox" in log
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        predictions = json.load(f)
    assert predictions and {p["category_id"] for p in predictions} <= {3, 7}

    # config.yaml holds the registration: it re-evaluates the trained model by itself, with
    # the same predictions.
    saved = os.path.join(out, "config.yaml")
    assert not os.path.exists(saved + ".pkl")
    out_eval = str(tmp_path / "eval")
    rc, log = run_train_net(
        "--config-file",
        saved,
        "--eval-only",
        f"train.init_checkpoint={out}/model_final.pth",
        f"train.output_dir={out_eval}",
    )
    assert rc == 0, log[-4000:]
    assert per_category_ap(log)[0] == ["pothole", "road crack"]
    with open(os.path.join(out_eval, "inference", "coco_instances_results.json")) as f:
        again = json.load(f)
    key = lambda p: (p["image_id"], p["category_id"], -p["score"])  # noqa: E731
    assert len(again) == len(predictions)
    for a, b in zip(sorted(predictions, key=key), sorted(again, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert np.allclose(a["bbox"], b["bbox"], atol=1e-2) and abs(a["score"] - b["score"]) < 1e-4


@pytest.mark.slow
def test_way2_user_config_on_a_shipped_config_with_two_workers(tmp_path):
    write_dataset(str(tmp_path / "data"))
    config = tmp_path / "my_config.py"
    config.write_text(WAY2_CONFIG)

    # The names reach both mappers' classes (shapes_tiny.py's own training names are two
    # datasets, a detection and a REC split) and the evaluator.
    cfg = LazyConfig.load(str(config))
    assert instantiate(cfg.dataloader.train.mapper).thing_classes == ["cls 3", "road crack"]
    assert instantiate(cfg.dataloader.test.mapper).thing_classes == ["cls 3", "road crack"]
    out = str(tmp_path / "output")
    rc, log = run_train_net(
        "--config-file",
        str(config),
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",  # a free port: other runs may hold detectron2's default one
        f"train.output_dir={out}",
        *FAST,
    )
    assert rc == 0, log[-4000:]
    assert iterations(out) == [0, 1, 2]
    assert os.path.isfile(os.path.join(out, "log.txt.rank1"))  # the second worker ran
    assert per_category_ap(log)[0] == ["cls_3", "road_crack"]  # the json's names
    saved = LazyConfig.load(os.path.join(out, "config.yaml"))
    assert saved.dataloader.train.dataset.names == "own_train"


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("own_data")), num_train=2, num_test=1)


def instantiate_data(overrides):
    """What train_net.py builds from finetune_coco_format.py: the loaders' datasets and
    mappers, and the evaluator."""
    cfg = LazyConfig.load(get_config_file("finetune_coco_format.py"))
    cfg.model.text_encoder.name_or_path = local_bert_dir()  # the offline tokenizer
    cfg = LazyConfig.apply_overrides(cfg, [f"dataset.name=t{uuid.uuid4().hex[:8]}", *overrides])
    dicts = instantiate(cfg.dataloader.train.dataset)
    mapper = instantiate(cfg.dataloader.train.mapper)
    evaluator = instantiate(cfg.dataloader.evaluator)
    return dicts, mapper, evaluator


def test_class_names_rename_the_json_categories(data):
    dicts, mapper, evaluator = instantiate_data(
        dataset_overrides(data) + ["dataset.class_names=[pothole,wet_road]"]
    )
    assert mapper.thing_classes == ["pothole", "wet road"]
    assert evaluator._metadata.thing_classes == ["pothole", "wet road"]
    assert evaluator._metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert sorted({a["category_id"] for d in dicts for a in d["annotations"]}) == [0, 1]
    _, mapper, _ = instantiate_data(dataset_overrides(data))
    assert mapper.thing_classes == ["cls 3", "road crack"]  # the json's names, cleaned


def _break(data, what):
    """Overrides that break one input; returns (overrides, the expected message)."""
    bad = os.path.join(os.path.dirname(data), f"bad_{uuid.uuid4().hex[:6]}")
    os.makedirs(bad)
    ok = dataset_overrides(data)
    if what == "unset":
        return ok[1:], "dataset.train_json is not set"
    if what == "missing json":
        return [f"dataset.train_json={bad}/nope.json"] + ok[1:], (
            f"dataset.train_json={bad}/nope.json: no such file"
        )
    if what == "empty json":
        open(f"{bad}/empty.json", "w").close()
        return [f"dataset.train_json={bad}/empty.json"] + ok[1:], (
            f"dataset.train_json={bad}/empty.json is empty"
        )
    if what == "no images in json":
        with open(f"{bad}/noimages.json", "w") as f:
            json.dump({"images": [], "annotations": [], "categories": CATEGORIES}, f)
        return [f"dataset.train_json={bad}/noimages.json"] + ok[1:], "has no 'images'"
    if what == "missing folder":
        return ok[:3] + [f"dataset.test_images={bad}/nope"], (
            f"dataset.test_images={bad}/nope: no such folder"
        )
    if what == "empty folder":
        return ok[:1] + [f"dataset.train_images={bad}"] + ok[2:], (
            f"dataset.train_images={bad} is empty"
        )
    if what == "missing image":
        cv2.imwrite(f"{bad}/0001.jpg", np.zeros((8, 8, 3), np.uint8))
        return ok[:1] + [f"dataset.train_images={bad}"] + ok[2:], (
            f"1 of the 2 images listed in dataset.train_json={data}/train.json are not in "
            f"dataset.train_images={bad}, e.g. '0002.jpg'"
        )
    if what == "class count":
        return ok + ["dataset.class_names=[a,b,c]"], (
            f"dataset.class_names has 3 names but dataset.train_json={data}/train.json has 2 "
            "categories"
        )
    if what == "same names":
        return ok + ["dataset.class_names=[road_crack,road crack]"], (
            "categories 3 and 7 have the same prompt name 'road crack'"
        )
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "unset",
        "missing json",
        "empty json",
        "no images in json",
        "missing folder",
        "empty folder",
        "missing image",
        "class count",
        "same names",
    ],
)
def test_bad_inputs_name_the_key_and_the_path(data, what):
    overrides, message = _break(data, what)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        instantiate_data(overrides)
    assert message in str(info.value)


def test_train_net_reports_a_missing_annotation_file(tmp_path):
    config = tmp_path / "finetune_tiny.py"
    config.write_text(WAY1_CONFIG)
    missing = str(tmp_path / "train.json")
    rc, log = run_train_net(
        "--config-file",
        str(config),
        f"dataset.train_json={missing}",
        f"dataset.train_images={tmp_path}",
        f"train.output_dir={tmp_path}/out",
        *FAST,
        timeout=120,
    )
    assert rc != 0
    assert f"FileNotFoundError: dataset.train_json={missing}: no such file" in log


def test_thing_classes_of_several_datasets(data):
    tag = uuid.uuid4().hex[:8]
    a = register_coco_format(f"a_{tag}", f"{data}/train.json", f"{data}/images")
    b = register_coco_format(f"b_{tag}", f"{data}/test.json", f"{data}/images")
    renamed = register_coco_format(f"c_{tag}", f"{data}/test.json", f"{data}/images", ["x", "y"])
    captions = f"g_{tag}"  # a grounding dataset: no categories, never loaded (no file)
    register_mdetr(captions, "/nonexistent/final_flickr.json", "/nonexistent", "grounding")
    assert get_thing_classes([a, captions, b]) == ["cls 3", "road crack"]
    assert get_thing_classes(a) == ["cls 3", "road crack"]
    with pytest.raises(ValueError, match="different thing_classes"):
        get_thing_classes((a, renamed))
    with pytest.raises(KeyError, match="none is a detection dataset"):
        get_thing_classes([captions])
    # Registering again with the same arguments is a no-op (every evaluation instantiates the
    # config again); with other files it is an error.
    assert register_coco_format(a, f"{data}/train.json", f"{data}/images") == a
    with pytest.raises(ValueError, match="already registered"):
        register_coco_format(a, f"{data}/test.json", f"{data}/images")
