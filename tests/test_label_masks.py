"""``python -m grounding_dino.label --sam DIR`` and ``--format yolo``: masks in the COCO dataset
and YOLO datasets through ``supervision``.

A tiny random ``shapes_tiny.py`` detector and a tiny perturbed random ``SamModel`` folder
(``tests/sam_reference.py``); the expected masks come from the mask stage called in this
process on the predictor's boxes, the decoding from pycocotools, the YOLO reading from
``sv.DetectionDataset.from_yolo``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from sam_reference import tiny_segmenter_folder

from grounding_dino.model_zoo import get_config, get_config_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red square", "blue circle"]
OVERRIDES = [  # 128 px and 20 queries: fast on the CPU
    "dataloader.test.mapper.augmentations.min_size=128",
    "dataloader.test.mapper.augmentations.max_size=128",
    "model.query_selector.num_queries=20",
]
NAMES = ["a.png", "b.jpg", "sub/c.png"]
MAX_PER_IMAGE, NMS = 5, 0.5
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random tiny detector weights, a tiny SAM folder and 3 images (one in a subfolder)."""
    from detectron2.config import instantiate

    root = tmp_path_factory.mktemp("label_masks")
    cfg = get_config("shapes_tiny.py")
    cfg.model.query_selector.num_queries = 20
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, weights)
    _, _, sam = tiny_segmenter_folder("sam", root / "sam")
    images = root / "photos"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        image = np.full((96 + 8 * i, 128 - 4 * i, 3), rng.integers(80, 200, 3), np.uint8)
        cv2.rectangle(image, (10 + 5 * i, 12), (60, 70 - i), (0, 0, 255), -1)
        cv2.circle(image, (95, 40 + 3 * i), 15, (255, 0, 0), -1)
        cv2.imwrite(str(images / name), image)
    return {"root": root, "weights": str(weights), "sam": sam, "images": str(images)}


def _arguments(setup, output, *extra):
    arguments = ["--config-file", get_config_file("shapes_tiny.py"), "--weights", setup["weights"]]
    arguments += ["--input", setup["images"], "--classes", ", ".join(CLASSES)]
    arguments += ["--output", str(output), "--box-threshold", "0", "--nms", str(NMS)]
    arguments += ["--max-per-image", str(MAX_PER_IMAGE), "--decode-workers", "0", *extra]
    return arguments + ["--opts", *OVERRIDES]


def _label(setup, output, *extra):
    """The command in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "grounding_dino.label", *_arguments(setup, output, *extra)]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _label_here(capsys, setup, output, *extra):
    """The command's ``main`` in this process (no interpreter to start): (status, out, err)."""
    from grounding_dino.label.cli import main

    try:
        status = main(_arguments(setup, output, *extra))
    except SystemExit as exit_info:  # argparse's error: status 2
        status = exit_info.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], status, out, err)


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def coco_with_masks(setup):
    """One run with --sam sharded over 2 workers: the COCO file's path."""
    output = setup["root"] / "coco" / "labels.json"
    result = _ok(_label(setup, output, "--sam", setup["sam"], "--num-gpus", "2"))
    assert f"Wrote {output}: 3 images, {3 * MAX_PER_IMAGE} masks, 2 classes." in result.stdout
    return output


def _expected_masks(setup):
    """{file name: (boxes (N, 4), masks (N, H, W) bool, logits (N, H, W))}: the predictor and
    the mask stage called in this process with the labeller's settings."""
    from grounding_dino.io.images import read_bgr
    from grounding_dino.label.worker import labelling_settings
    from grounding_dino.predictor import GroundingDINOPredictor
    from grounding_dino.segment import MaskStage

    predictor = GroundingDINOPredictor.from_config_file(
        "shapes_tiny.py", weights=setup["weights"], overrides=OVERRIDES, device="cpu"
    )
    settings = labelling_settings(
        predictor.settings,
        {"box_threshold": 0.0, "nms": NMS, "max_per_image": MAX_PER_IMAGE},
    )
    stage = MaskStage.from_pretrained(setup["sam"])
    expected = {}
    for name in NAMES:
        image = read_bgr(os.path.join(setup["images"], name))
        (output,) = predictor.predict_batch([image], [CLASSES], settings=settings)
        boxes = output["instances"].pred_boxes.tensor
        masks = stage(np.ascontiguousarray(image[:, :, ::-1]), boxes)
        expected[name] = (boxes, masks.masks, masks.logits)
    return expected


def test_coco_rle_decodes_to_the_stages_masks(setup, coco_with_masks):
    """The 2 workers' COCO file: each RLE decodes (pycocotools) to the mask the stage gives for
    the predictor's box, and its area is the mask's."""
    coco = COCO(str(coco_with_masks))
    expected = _expected_masks(setup)
    assert sorted(image["file_name"] for image in coco.dataset["images"]) == sorted(NAMES)
    for image in coco.dataset["images"]:
        boxes, masks, logits = expected[image["file_name"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == len(masks) == MAX_PER_IMAGE
        for annotation, box, mask, logit in zip(annotations, boxes, masks, logits):
            decoded = torch.from_numpy(coco.annToMask(annotation).astype(bool))
            assert decoded.shape == (image["height"], image["width"])
            # Another process may round differently: only pixels at the threshold may differ.
            differ = decoded != mask
            assert logit[differ].abs().max().item() < 1e-4 if differ.any() else True
            assert (
                annotation["area"]
                == int(decoded.sum())
                == mask_utils.area(annotation["segmentation"])
            )
            assert isinstance(annotation["segmentation"]["counts"], str)  # json-able RLE
            xywh = box.tolist()
            xywh[2:] = [xywh[2] - xywh[0], xywh[3] - xywh[1]]
            np.testing.assert_allclose(annotation["bbox"], xywh, atol=0.01)


def test_a_rerun_resumes_and_other_settings_are_refused(setup, coco_with_masks, capsys):
    before = json.loads(coco_with_masks.read_text())
    # A rerun resumes from the part files: nothing to do, the same dataset is written again.
    rerun = _ok(_label_here(capsys, setup, coco_with_masks, "--sam", setup["sam"]))
    assert "3 already labelled, 0 to do" in rerun.stdout
    assert json.loads(coco_with_masks.read_text()) == before
    # The same --output without --sam is another run: refused, the difference named.
    other = _label_here(capsys, setup, coco_with_masks)
    assert other.returncode == 2 and "segmenter: was {" in other.stderr, other.stderr


def _per_class_union(masks: np.ndarray, classes: np.ndarray, image_shape) -> dict:
    return {
        k: masks[classes == k].any(0) if (classes == k).any() else np.zeros(image_shape, bool)
        for k in range(len(CLASSES))
    }


def test_yolo_segmentation_dataset_loads_back_with_supervision(setup, coco_with_masks, capsys):
    """--format yolo --sam: polygons (one per connected part of a mask) that supervision reads
    back as masks covering the same pixels per class; images copied; data.yaml for training."""
    output = setup["root"] / "yolo_seg"
    result = _ok(_label_here(capsys, setup, output, "--sam", setup["sam"], "--format", "yolo"))
    assert "(YOLO: images/, labels/, data.yaml)" in result.stdout
    data = sv.DetectionDataset.from_yolo(
        str(output / "images"), str(output / "labels"), str(output / "data.yaml"), force_masks=True
    )
    assert data.classes == CLASSES
    coco = COCO(str(coco_with_masks))
    by_base = {os.path.basename(i["file_name"]): i for i in coco.dataset["images"]}
    assert sorted(os.path.basename(p) for p in data.image_paths) == sorted(by_base)
    for path, image, detections in data:
        info = by_base[os.path.basename(path)]
        original = cv2.imread(os.path.join(setup["images"], info["file_name"]))
        assert np.array_equal(image, original)  # the image, copied as it is
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        ours = np.stack([coco.annToMask(a).astype(bool) for a in annotations])
        ours_classes = np.array([a["category_id"] - 1 for a in annotations])
        shape = image.shape[:2]
        want = _per_class_union(ours, ours_classes, shape)
        got = _per_class_union(detections.mask, detections.class_id, shape)
        for k in want:
            union = (want[k] | got[k]).sum()
            iou = (want[k] & got[k]).sum() / union if union else 1.0
            assert iou > 0.97, (path, k, iou)
    text = (output / "data.yaml").read_text()
    assert "train: images" in text and "val: images" in text


def test_yolo_detection_dataset_has_the_same_boxes(setup, coco_with_masks, tmp_path):
    """The export without masks (write_yolo_dataset, as --format yolo without --sam): the
    boxes supervision reads back are the COCO file's (to the format's 5 decimals)."""
    from grounding_dino.label.yolo import write_yolo_dataset

    dataset = json.loads(coco_with_masks.read_text())
    for annotation in dataset["annotations"]:
        del annotation["segmentation"]
    paths = {name: os.path.join(setup["images"], name) for name in NAMES}
    write_yolo_dataset(str(tmp_path / "yolo"), dataset, paths, segmentation=False)
    data = sv.DetectionDataset.from_yolo(
        str(tmp_path / "yolo" / "images"),
        str(tmp_path / "yolo" / "labels"),
        str(tmp_path / "yolo" / "data.yaml"),
    )
    by_base = {os.path.basename(i["file_name"]): i for i in dataset["images"]}
    for path, image, detections in data:
        info = by_base[os.path.basename(path)]
        boxes = [a for a in dataset["annotations"] if a["image_id"] == info["id"]]
        want = np.array([a["bbox"] for a in boxes], dtype=np.float64)
        want[:, 2:] += want[:, :2]
        assert detections.mask is None
        np.testing.assert_allclose(detections.xyxy, want, atol=1e-5 * max(image.shape) + 1e-3)
        assert detections.class_id.tolist() == [a["category_id"] - 1 for a in boxes]


def test_existing_outputs_are_never_overwritten(setup, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    result = _label_here(capsys, setup, folder, "--format", "yolo")
    assert result.returncode == 2
    assert f"--output {folder} exists and no labelling run wrote it" in result.stderr
    assert os.listdir(folder) == ["keep.txt"] and not Path(f"{folder}.parts").exists()
    # A --sam that is not a segmenter folder is named before anything starts.
    missing = tmp_path / "no_sam"
    result = _label_here(capsys, setup, tmp_path / "labels.json", "--sam", str(missing))
    assert result.returncode == 2
    assert f"The segmenter folder {missing} does not exist" in result.stderr
    assert not (tmp_path / "labels.json.parts").exists()


def test_yolo_refuses_inputs_whose_names_clash():
    from grounding_dino.label.yolo import check_yolo_names

    check_yolo_names({"a/x.png": "", "b/y.png": ""})
    with pytest.raises(ValueError, match=r"share a file name stem \(a/x.png, b/x.jpg\)"):
        check_yolo_names({"a/x.png": "", "b/x.jpg": "", "c.png": ""})
