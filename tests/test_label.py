"""``python -m grounding_dino.label``: a folder and a class list in, a COCO dataset out.

Runs the command in subprocesses on a small random ``shapes_tiny.py`` model (random weights
with ``--box-threshold 0`` still give boxes): the COCO file against pycocotools, detectron2's
``register_coco_instances`` and the predictor called directly; 2 workers against 1; ``kill -9``
and resume against an uninterrupted run; a corrupt file; settings that differ on resume; and
label -> fine-tune (``configs/finetune_coco_format.py``) -> evaluate.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from nms_reference import nms_output
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from grounding_dino.model_zoo import get_config, get_config_file
from grounding_dino.modeling.nms import classwise_nms

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red circle", "blue square", "green star"]
CLASS_LIST = ", ".join(CLASSES)
OVERRIDES = [  # 128 px and 20 queries: fast on the CPU
    "dataloader.test.mapper.augmentations.min_size=128",
    "dataloader.test.mapper.augmentations.max_size=128",
    "model.query_selector.num_queries=20",
]
MAX_PER_IMAGE, NMS = 12, 0.5
NAMES = sorted(
    [f"img{i}.png" for i in range(0, 10, 2)] + [f"sub/img{i}.png" for i in range(1, 10, 2)]
)


def _image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(80, 200, 3), np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(image, (x, y), (x + 20, y + 20), color, -1)
    return image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random tiny weights and a folder of 10 images (half in a subfolder), one corrupt."""
    root = tmp_path_factory.mktemp("label")
    cfg = get_config("shapes_tiny.py")
    cfg.model.query_selector.num_queries = 20
    from detectron2.config import instantiate

    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, weights)
    images = root / "photos"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(NAMES):
        cv2.imwrite(str(images / name), _image(i, 96 + 7 * i, 150 - 5 * i))
    (images / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "weights": str(weights), "images": str(images)}


def _command(setup, output, *extra, classes=CLASS_LIST):
    return [
        sys.executable,
        "-m",
        "grounding_dino.label",
        "--config-file",
        get_config_file("shapes_tiny.py"),
        "--weights",
        setup["weights"],
        "--input",
        setup["images"],
        "--classes",
        classes,
        "--output",
        str(output),
        "--box-threshold",
        "0",
        "--nms",
        str(NMS),
        "--max-per-image",
        str(MAX_PER_IMAGE),
        "--decode-workers",
        "1",
        *extra,
        "--opts",
        *OVERRIDES,
    ]


ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _label(setup, output, *extra, **kwargs):
    return subprocess.run(
        _command(setup, output, *extra, **kwargs),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(setup):
    """One worker, batches of 2, uninterrupted."""
    output = setup["root"] / "one" / "labels.json"
    done = _label(setup, output, "--batch-size", "2")
    return output, done


def _assert_same_dataset(a, b):
    """Equal datasets up to float noise (batch composition moves boxes by ~1e-5 px)."""
    assert a["images"] == b["images"] and a["categories"] == b["categories"]
    assert len(a["annotations"]) == len(b["annotations"])
    for x, y in zip(a["annotations"], b["annotations"]):
        assert (x["id"], x["image_id"], x["category_id"]) == (
            y["id"],
            y["image_id"],
            y["category_id"],
        )
        assert np.allclose(x["bbox"], y["bbox"], atol=0.02) and abs(x["score"] - y["score"]) < 2e-5


def _children(pid):
    """The live child processes of ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def _label_lines_of(part):
    lines = [json.loads(line) for line in part.read_text().splitlines() if line.endswith("}")]
    return [r for r in lines if "error" not in r and "attempt" not in r]


def _open_part(pid):
    """The part file process ``pid`` holds open, or None."""
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        with contextlib.suppress(OSError):
            target = Path(os.readlink(fd))
            if target.name.startswith("part-") and target.suffix == ".jsonl":
                return target
    return None


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _label_lines(folder):
    """The label (not error, not attempt) records of every part file."""
    lines = []
    for part in sorted(Path(folder).glob("part-*.jsonl")):
        lines += [json.loads(line) for line in part.read_text().splitlines()]
    return [r for r in lines if "error" not in r and "attempt" not in r]


# ---------------------------------------------------------------- NMS
def _naive_nms(boxes, scores, classes, iou):
    """Greedy NMS per class in plain Python, best score first."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        if all(
            classes[i] != classes[j] or box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= iou
            for j in kept
        ):
            kept.append(i)
    return kept


def test_classwise_nms_against_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=generator) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=generator) * 20], dim=1)
    scores = torch.rand(60, generator=generator)
    classes = torch.randint(0, 3, (60,), generator=generator)
    keep = classwise_nms(boxes, scores, classes, 0.5)
    assert keep.tolist() == _naive_nms(boxes, scores, classes, 0.5)
    assert len(keep) < 60  # something was suppressed
    assert classwise_nms(boxes, scores, classes, 0.5, 5).tolist() == keep[:5].tolist()
    # 0 turns NMS off: only sorted and capped.
    assert (
        classwise_nms(boxes, scores, classes, 0.0, 7).tolist()
        == scores.argsort(descending=True)[:7].tolist()
    )
    with pytest.raises(ValueError, match="IoU threshold"):
        classwise_nms(boxes, scores, classes, 1.5)

    from detectron2.structures import Boxes, Instances

    instances = Instances((100, 100), pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes)
    phrases = [f"p{i}" for i in range(60)]
    out = nms_output({"instances": instances, "phrases": phrases}, 0.5)
    assert out["phrases"] == [phrases[i] for i in keep.tolist()]
    assert torch.equal(out["instances"].scores, scores[keep])


# ---------------------------------------------------------------- the COCO file
def _expected(setup, name):
    """The predictor called directly on one image, then NMS per class by torchvision's nms."""
    from torchvision.ops import nms

    from grounding_dino.predictor import GroundingDINOPredictor

    if "predictor" not in setup:
        cfg = get_config("shapes_tiny.py")
        from detectron2.config import LazyConfig

        cfg = LazyConfig.apply_overrides(cfg, OVERRIDES)
        predictor = GroundingDINOPredictor(cfg, weights=setup["weights"])
        setup["predictor"] = predictor
    image = cv2.imread(os.path.join(setup["images"], name))
    predictor = setup["predictor"]
    every_box = predictor.settings.replace(box_threshold=0.0)
    instances = predictor(image, CLASSES, settings=every_box)["instances"]
    boxes, scores, classes = instances.pred_boxes.tensor, instances.scores, instances.pred_classes
    kept = torch.cat(
        [
            torch.where(classes == c)[0][nms(boxes[classes == c], scores[classes == c], NMS)]
            for c in classes.unique()
        ]
    )
    kept = kept[scores[kept].argsort(descending=True)][:MAX_PER_IMAGE]
    xyxy = boxes[kept]
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
    return xywh.numpy(), scores[kept].numpy(), (classes[kept] + 1).tolist(), image.shape[:2]


def test_coco_dataset_against_pycocotools_detectron2_and_the_predictor(setup, reference):
    output, done = reference
    # The corrupt file is reported, the others are labelled, the exit status says so.
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    broken = os.path.join(setup["images"], "sub", "broken.jpg")
    assert f"ERROR {broken}: cannot read the image: not an image" in done.stderr
    assert "11/11" in done.stderr  # one bar over every image
    error_lines = Path(f"{output}.errors").read_text().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith(broken + "\tcannot read the image")

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(output))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    assert coco.getCatIds() == [1, 2, 3]
    images = coco.loadImgs(coco.getImgIds())
    assert [im["file_name"] for im in images] == NAMES  # relative to the input folder
    total = 0
    for image in images:
        xywh, scores, classes, (height, width) = _expected(setup, image["file_name"])
        assert (image["height"], image["width"]) == (height, width)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert 0 < len(anns) <= MAX_PER_IMAGE
        assert [a["category_id"] for a in anns] == classes
        assert np.allclose([a["bbox"] for a in anns], xywh, atol=0.01)
        assert np.allclose([a["score"] for a in anns], scores, atol=1e-5)
        for a in anns:
            assert a["iscrowd"] == 0 and abs(a["area"] - a["bbox"][2] * a["bbox"][3]) < 0.01
        total += len(anns)
    assert total == len(coco.getAnnIds())
    # NMS happened: no two boxes of one class in an image overlap above the threshold.
    for image in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        for c in set(a["category_id"] for a in anns):
            b = torch.tensor([a["bbox"] for a in anns if a["category_id"] == c])
            b[:, 2:] += b[:, :2]
            iou = box_iou(b, b) - torch.eye(len(b))
            assert iou.max() <= NMS + 1e-3

    # detectron2 loads it as a training dataset.
    name = "gdino_test_label_output"
    register_coco_instances(name, {}, str(output), setup["images"])
    try:
        dicts = DatasetCatalog.get(name)
        assert MetadataCatalog.get(name).thing_classes == CLASSES
        assert len(dicts) == len(NAMES)
        assert all(os.path.isfile(d["file_name"]) for d in dicts)
        annotations = [a for d in dicts for a in d["annotations"]]
        assert len(annotations) == total
        assert {a["category_id"] for a in annotations} <= {0, 1, 2}
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annotations)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_two_workers_equal_one_worker(setup, reference):
    output = setup["root"] / "two" / "labels.json"
    done = _label(setup, output, "--num-gpus", "2", "--batch-size", "3")
    assert done.returncode == 1, done.stderr[-3000:]  # the corrupt file, as with one worker
    parts = sorted((output.parent / "labels.json.parts").glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl"]
    assert all(p.read_text().strip() for p in parts)  # both workers labelled images
    _assert_same_dataset(_read(output), _read(reference[0]))
    assert Path(f"{output}.errors").read_text() == Path(f"{reference[0]}.errors").read_text()


def test_kill_and_resume_equals_an_uninterrupted_run(setup, reference):
    """``kill -9`` of the main process only (what the OOM killer does) while its 2 workers and
    their DataLoader decoding processes are alive: they die with it and the decoding processes
    hold no lock, so the same command run at once goes on, and the result equals an
    uninterrupted run."""
    output = setup["root"] / "killed" / "labels.json"
    parts = output.parent / "labels.json.parts"
    process = subprocess.Popen(
        _command(setup, output, "--batch-size", "1", "--num-gpus", "2", "--decode-workers", "1"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    frozen = {}  # worker pid -> its decoding processes
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and len(frozen) < 2:
            assert time.monotonic() < deadline
            for worker in _children(process.pid):  # 2 workers (and multiprocessing's tracker)
                part, decoders = _open_part(worker), _children(worker)
                # Stopped once it has labelled an image while its decoders are alive, so that
                # neither worker can finish its shard before the kill, however fast the machine.
                if worker not in frozen and part and decoders and _label_lines_of(part):
                    os.kill(worker, signal.SIGSTOP)
                    frozen[worker] = decoders
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)  # the main process only
        descendants = list(frozen) + [pid for pids in frozen.values() for pid in pids]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert len(frozen) == 2, "both workers should be stopped mid-run"
    assert not output.exists()
    done_before = len(_label_lines(parts))
    assert 2 <= done_before < len(NAMES), "the run should be killed half-way"
    # A kill in the middle of a write leaves a cut line; it is dropped and redone.
    with open(parts / "part-00000.jsonl", "a") as f:
        f.write('{"file_name":"img8.png","width":1')

    again = _label(setup, output, "--batch-size", "2")  # at once: nothing holds a lock
    assert again.returncode == 1, again.stderr[-3000:]
    assert not [pid for pid in descendants if _alive(pid)], "processes outlived the labeller"
    assert f"{len(NAMES) + 1} images under" in again.stdout
    assert f"{done_before} already labelled" in again.stdout
    _assert_same_dataset(_read(output), _read(reference[0]))
    # Nothing twice: every image has exactly one label line over both runs.
    assert sorted(r["file_name"] for r in _label_lines(parts)) == NAMES

    # Run again: nothing to do, the same file.
    third = _label(setup, output)
    assert f"{len(NAMES)} already labelled" in third.stdout
    _assert_same_dataset(_read(output), _read(reference[0]))


def test_a_killed_decoding_process_does_not_stop_the_run(setup, reference):
    """``kill -9`` of a DataLoader decoding process mid-run: the worker starts the loader again
    from the batch it was waiting for, and the run ends as an uninterrupted one."""
    output = setup["root"] / "decoder_killed" / "labels.json"
    parts = output.parent / "labels.json.parts"
    process = subprocess.Popen(
        _command(setup, output, "--batch-size", "1", "--decode-workers", "2"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_label_lines(parts)) < 2 and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Stopped while its decoder is killed, so that the run cannot end first on a fast machine.
        os.kill(process.pid, signal.SIGSTOP)
        decoders = _children(process.pid)
        assert decoders, "the decoding process should be alive mid-run"
        os.kill(decoders[0], signal.SIGKILL)
        os.kill(process.pid, signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, stderr[-3000:]  # the corrupt file, as uninterrupted
    assert "decoding again from image" in stderr
    _assert_same_dataset(_read(output), _read(reference[0]))
    assert Path(f"{output}.errors").read_text() == Path(f"{reference[0]}.errors").read_text()


def test_other_settings_or_a_foreign_file_are_errors(setup, reference):
    output = reference[0]
    before = output.read_bytes()
    done = _label(setup, output, classes="red circle, blue square")
    assert done.returncode == 2
    assert "classes: was ['red circle', 'blue square', 'green star']" in done.stderr
    assert output.read_bytes() == before
    foreign = setup["root"] / "mine.json"
    foreign.write_text('{"my": "data"}')
    done = _label(setup, foreign)
    assert done.returncode == 2 and "not overwritten" in done.stderr
    assert foreign.read_text() == '{"my": "data"}'


FINETUNE_CONFIG = """
from detectron2.config import LazyConfig
from grounding_dino.model_zoo import get_config, get_config_file

_base = LazyConfig.load(get_config_file("finetune_coco_format.py"))
dataset, dataloader, train = _base.dataset, _base.dataloader, _base.train
optimizer, lr_multiplier = _base.optimizer, _base.lr_multiplier
_tiny = get_config("shapes_tiny.py")
model = _tiny.model
model.query_selector.num_queries = 20
dataloader.train.mapper.augmentations = _tiny.dataloader.train.mapper.augmentations
dataloader.test.mapper.augmentations = _tiny.dataloader.test.mapper.augmentations
"""


@pytest.mark.slow
def test_label_then_finetune_then_evaluate(setup, reference):
    """The labels train directly with configs/finetune_coco_format.py and evaluate."""
    config = setup["root"] / "finetune_tiny.py"
    config.write_text(FINETUNE_CONFIG)
    labels, out = reference[0], setup["root"] / "finetuned"
    command = [
        sys.executable,
        str(REPO / "train_net.py"),
        "--config-file",
        str(config),
        f"dataset.train_json={labels}",
        f"dataset.train_images={setup['images']}",
        f"dataset.test_json={labels}",
        f"dataset.test_images={setup['images']}",
        f"train.init_checkpoint={setup['weights']}",
        "train.init_partial=False",
        f"train.output_dir={out}",
        "train.device=cpu",
        "train.max_iter=2",
        "train.eval_period=0",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert (out / "model_final.pth").is_file()
    assert "copypaste: Task: bbox" in log
    table = log.split("Per-category bbox AP:")[-1]
    assert all(f"| {name}" in table for name in CLASSES)
    predictions = _read(out / "inference" / "coco_instances_results.json")
    gt = _read(labels)
    assert {p["image_id"] for p in predictions} == {im["id"] for im in gt["images"]}
    assert {p["category_id"] for p in predictions} <= {1, 2, 3}
