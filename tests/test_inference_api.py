"""Inference for users: DefaultPredictor through the yacs bridge, GroundingDINOPredictor
(batches, REC, token spans, input checks) and the demo CLI, on a tiny converted model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from hf_reference import tiny_hf_config
from nms_reference import nms_output
from omegaconf import OmegaConf

from grounding_dino import GroundingDINO, InferenceSettings
from grounding_dino.config import (
    add_grounding_dino_config,
    default_prompt_from_yacs,
    resolve_config_file,
)
from grounding_dino.io.coco_files import JsonListWriter
from grounding_dino.io.detect_files import FileDetector
from grounding_dino.io.inputs import VIDEO_EXTENSIONS, expand_inputs, plan_outputs
from grounding_dino.modeling.settings import NMS_CANDIDATES
from grounding_dino.predictor import GroundingDINOPredictor
from grounding_dino.preprocessing import check_token_spans, parse_token_spans
from grounding_dino.resize import (
    OfficialResize,
    official_output_size,
    official_resize_from_lazy_config,
)

REPO = Path(__file__).resolve().parents[1]
TEST_SIZE, TEST_MAX_SIZE = 96, 128  # the official rule at a small scale, for speed
CAPTION = "cat . remote control ."
CLASSES = ["cat", "remote control"]
METADATA_NAME = "gdino_test_inference_api_classes"


def _tiny_hf_model(folder: Path) -> None:
    """A random transformers Grounding DINO, small enough for the CPU, saved to ``folder``."""
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(tiny_hf_config())
    with torch.no_grad():  # small decoder outputs: scores spread over ~0.5-0.7, not all 1.0
        model.model.decoder.layer_norm.weight.mul_(0.03)
        model.model.decoder.layer_norm.bias.zero_()
    model.save_pretrained(folder)


def _test_resize(min_size, **more):
    return {
        "_target_": "grounding_dino.data.transforms.build_test_augmentations",
        "min_size": min_size,
        "max_size": TEST_MAX_SIZE,
        **more,
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory, minilm_dir):
    """``{"lazy": lazy config yaml (small test resize), "weights": model.pth}``, made once."""
    from grounding_dino.convert.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("tiny_gdino")
    _tiny_hf_model(root / "hf")
    code = convert_main(["hf", str(root / "hf"), str(root / "out"), "--tokenizer", minilm_dir])
    assert code == 0
    lazy = LazyConfig.load(str(root / "out" / "config.yaml"))
    lazy.dataloader = {"test": {"mapper": {"augmentations": _test_resize(TEST_SIZE)}}}
    path = root / "small.yaml"
    LazyConfig.save(lazy, str(path))
    return {"lazy": str(path), "weights": str(root / "out" / "model.pth"), "root": root}


@pytest.fixture(scope="module")
def predictor(converted):
    return GroundingDINOPredictor.from_config_file(converted["lazy"], converted["weights"])


def _image(seed: int, height: int, width: int) -> np.ndarray:
    """A random BGR picture with a few flat rectangles."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y : y + height // 3, x : x + width // 3] = rng.integers(0, 255, 3)
    return image


def _yacs_cfg(converted, **fields):
    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "grounding_dino_swin_t_ogc.yaml"))
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = converted["lazy"]
    cfg.MODEL.WEIGHTS = converted["weights"]
    cfg.MODEL.DEVICE = "cpu"
    for key, value in fields.items():
        cfg.MODEL.GROUNDING_DINO[key] = value
    return cfg


def _assert_same(a, b, exact=True):
    ia, ib = a["instances"], b["instances"]
    assert len(ia) == len(ib) > 0
    if exact:
        assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
        assert torch.equal(ia.scores, ib.scores)
    else:
        torch.testing.assert_close(ia.pred_boxes.tensor, ib.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(ia.scores, ib.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(ia.pred_classes, ib.pred_classes)
    assert a["phrases"] == b["phrases"]


# ---------------------------------------------------------------- yacs bridge
def test_yaml_names_the_lazy_configs():
    for name in ("grounding_dino_swin_t_ogc", "grounding_dino_swin_b_cogcoor"):
        cfg = get_cfg()
        add_grounding_dino_config(cfg)
        cfg.merge_from_file(str(REPO / "configs" / f"{name}.yaml"))
        assert cfg.MODEL.META_ARCHITECTURE == "GroundingDINO"
        assert cfg.INPUT.FORMAT == "RGB" and cfg.INPUT.MIN_SIZE_TEST == 0
        assert Path(resolve_config_file(cfg.MODEL.GROUNDING_DINO.CONFIG_FILE)).name == f"{name}.py"


@pytest.fixture(scope="module")
def default_predictor(converted):
    """detectron2's own DefaultPredictor; no PROMPT, so DATASETS.TEST[0]'s classes are used."""
    if METADATA_NAME not in MetadataCatalog.list():
        MetadataCatalog.get(METADATA_NAME).set(thing_classes=CLASSES)
    cfg = _yacs_cfg(converted)
    cfg.DATASETS.TEST = (METADATA_NAME,)
    predictor = DefaultPredictor(cfg)
    assert type(predictor.model) is GroundingDINO
    return predictor


def test_default_predictor_equals_predictor(default_predictor, predictor, converted):
    assert default_predictor.model.default_prompt == CLASSES  # from the dataset's metadata
    # (97, 203): detectron2's ResizeShortestEdge rounds to 61x128, the official rule to 61x127.
    assert ResizeShortestEdge.get_output_shape(97, 203, TEST_SIZE, TEST_MAX_SIZE) != (
        official_output_size(97, 203, TEST_SIZE, TEST_MAX_SIZE)
    )
    for seed, (height, width) in enumerate([(120, 160), (97, 203), (300, 77)]):
        image = _image(seed, height, width)
        out = default_predictor(image)
        _assert_same(out, predictor(image, CLASSES))
        assert set(out["phrases"]) <= set(CLASSES)
    image = _image(5, 90, 140)
    with_caption = DefaultPredictor(_yacs_cfg(converted, PROMPT=CAPTION))
    _assert_same(with_caption(image), predictor(image, CAPTION))
    without = DefaultPredictor(_yacs_cfg(converted))  # no PROMPT and no dataset: no prompt
    with pytest.raises(ValueError, match="prompt"):
        without(image)


@pytest.mark.parametrize("name", ["GroundingDINO", "GroundingDINOFromYacs"])
def test_registered_names_build_through_default_predictor(converted, predictor, name):
    """The name users write in a yacs config (and the earlier yamls' name) build the same
    model, with outputs equal to GroundingDINOPredictor's."""
    cfg = _yacs_cfg(converted, PROMPT=CAPTION)
    cfg.MODEL.META_ARCHITECTURE = name
    default_predictor = DefaultPredictor(cfg)
    assert type(default_predictor.model).__name__ == name
    assert isinstance(default_predictor.model, GroundingDINO)
    image = _image(6, 120, 100)
    _assert_same(default_predictor(image), predictor(image, CAPTION))


def test_yacs_prompt_thresholds_and_overrides(converted):
    cfg = _yacs_cfg(converted, BOX_THRESHOLD=0.6, OVERRIDES=["model.max_detections=4"])
    assert default_prompt_from_yacs(cfg) is None
    cfg.MODEL.GROUNDING_DINO.PROMPT = CAPTION
    assert default_prompt_from_yacs(cfg) == CAPTION
    model = build_model(cfg).eval()  # what DefaultPredictor builds
    assert model.inference_settings.box_threshold == 0.6
    assert model.inference_settings.max_detections == 4
    assert model.default_prompt == CAPTION
    image = torch.as_tensor(_image(2, 110, 150)[:, :, ::-1].transpose(2, 0, 1).copy())
    out = model([{"image": image.float(), "height": 110, "width": 150}])[0]
    assert 0 < len(out["instances"]) <= 4
    assert bool((out["instances"].scores > 0.6).all())
    # Without "height"/"width", boxes come in the pixels of the image given (before the
    # bridge's resize to the test size).
    alone = model([{"image": image}])[0]
    assert alone["instances"].image_size == (110, 150)
    _assert_same(alone, out)


def test_test_resize_comes_from_the_config_and_typos_are_errors():
    resize = official_resize_from_lazy_config(OmegaConf.create({"model": {}}))
    assert (resize.short_edge, resize.max_size) == (800, 1333)  # an inference config
    cfg = OmegaConf.create({"dataloader": {"test": {"mapper": {"augmentations": None}}}})
    cfg.dataloader.test.mapper.augmentations = _test_resize(96)
    resize = official_resize_from_lazy_config(cfg)
    assert isinstance(resize, OfficialResize) and resize.short_edge == 96
    cfg.dataloader.test.mapper.augmentations = _test_resize(96, max_sise=100)
    with pytest.raises(TypeError, match="max_sise"):
        official_resize_from_lazy_config(cfg)
    cfg.dataloader.test.mapper = {"augmentation": _test_resize(96)}
    with pytest.raises(ValueError, match="dataloader.test.mapper.augmentations"):
        official_resize_from_lazy_config(cfg)
    cfg.dataloader.test.mapper = {
        "augmentations": [{"_target_": "detectron2.data.transforms.RandomFlip"}]
    }
    with pytest.raises(ValueError, match="one OfficialResize"):
        official_resize_from_lazy_config(cfg)


def test_yacs_errors_name_the_problem(converted):
    cfg = _yacs_cfg(converted)
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = "configs/no_such_config.py"
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        GroundingDINO(cfg)
    cfg = _yacs_cfg(converted, PROMPT=["cat", " "])
    with pytest.raises(ValueError, match="Class name 1"):
        DefaultPredictor(cfg)
    cfg = _yacs_cfg(converted, OVERRIDES=["model.box_threshold"])
    with pytest.raises(ValueError, match="not 'key=value'"):
        GroundingDINO(cfg)


class _RunsCode:
    """Unpickling this would create a folder (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_default_predictor_refuses_code_in_weights(converted, tmp_path):
    marker = tmp_path / "code_ran"
    weights = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, str(weights))
    cfg = _yacs_cfg(converted, PROMPT=CAPTION)
    cfg.MODEL.WEIGHTS = str(weights)
    with pytest.raises(ValueError, match="evil.pth"):
        DefaultPredictor(cfg)
    assert not marker.exists()


# ---------------------------------------------------------------- predictor
def test_predict_batch_equals_one_by_one(predictor):
    images = [_image(10, 120, 160), _image(11, 200, 90), _image(12, 96, 96)]
    prompts = [CAPTION, CLASSES, "a remote . the cat on the left"]
    batched = predictor.predict_batch(images, prompts)
    assert len(batched) == 3
    for image, prompt, out in zip(images, prompts, batched):
        _assert_same(out, predictor(image, prompt), exact=False)
    assert set(batched[1]["phrases"]) <= set(CLASSES)


def test_settings_are_per_call_checked_and_leave_the_predictor_alone(predictor):
    image = _image(7, 100, 120)
    before = predictor.settings
    assert before == predictor.model.inference_settings  # the config's values
    few = predictor(image, CAPTION, settings=before.replace(box_threshold=0.0, max_detections=5))
    assert len(few["instances"]) == 5
    assert predictor.settings == before and predictor.model.inference_settings == before
    with pytest.raises(ValueError, match="max_detections"):
        InferenceSettings(max_detections=0)
    with pytest.raises(ValueError, match="nms_threshold"):
        before.replace(nms_threshold=1.5)
    with pytest.raises(TypeError, match="box_treshold"):
        before.replace(box_treshold=0.1)
    with pytest.raises(TypeError, match="InferenceSettings"):
        predictor(image, CAPTION, settings={"box_threshold": 0.0})


def _nms_threshold_that_suppresses(instances) -> float:
    """Half the largest IoU of two boxes of one class (so class-wise NMS removes some)."""
    iou = pairwise_iou(instances.pred_boxes, instances.pred_boxes)
    same_class = instances.pred_classes[:, None] == instances.pred_classes[None]
    iou = iou.masked_fill(~same_class, 0).fill_diagonal_(0)
    assert float(iou.max()) > 0, "no two boxes of a class overlap: nothing to test"
    return float(iou.max()) / 2


def test_nms_setting_equals_classwise_nms_of_the_output(predictor):
    image = _image(9, 120, 120)
    loose = predictor.settings.replace(box_threshold=0.0, max_detections=NMS_CANDIDATES)
    for prompt in (CLASSES, CAPTION):
        # With NMS, the candidates are the best NMS_CANDIDATES; the cap comes after NMS.
        plain = predictor(image, prompt, settings=loose)
        threshold = _nms_threshold_that_suppresses(plain["instances"])
        kept = len(nms_output(plain, threshold)["instances"])
        assert kept < len(plain["instances"])
        cap = kept - 1
        got = predictor(
            image, prompt, settings=loose.replace(nms_threshold=threshold, max_detections=cap)
        )
        assert len(got["instances"]) == cap
        _assert_same(got, nms_output(plain, threshold, cap))


def test_rec_returns_exactly_one_box(predictor):
    image = _image(3, 110, 140)
    strict = predictor.settings.replace(box_threshold=0.99)  # REC ignores the threshold
    out = predictor.predict_rec(image, "the cat on the left", settings=strict)
    assert len(out["instances"]) == 1 and out["phrases"] == ["the cat on the left"]
    everything = predictor(
        image, "the cat on the left", settings=predictor.settings.replace(box_threshold=-1.0)
    )
    assert float(out["instances"].scores[0]) == float(everything["instances"].scores.max())
    with pytest.raises(ValueError, match="expression"):
        predictor.predict_rec(image, "  ")


def test_token_spans_ground_selected_phrases(predictor):
    image = _image(4, 100, 150)
    caption = "a cat and a remote"
    spans = [[[2, 5]], [[12, 18]]]  # "cat", "remote"
    settings = predictor.settings.replace(box_threshold=0.55)
    out = predictor.predict_token_spans(image, caption, spans, settings=settings)
    instances = out["instances"]
    assert len(instances) > 0 and set(out["phrases"]) <= {"cat", "remote"}
    assert bool((instances.scores > 0.55).all())
    assert torch.equal(instances.scores, instances.scores.sort(descending=True).values)
    # One token per phrase: the phrase score is that token's score ([CLS] a cat and a remote).
    tokenizer = predictor.model.tokenizer
    tokens = tokenizer("a cat and a remote .")["input_ids"]
    columns = {w: tokens.index(tokenizer.convert_tokens_to_ids(w)) for w in ("cat", "remote")}
    for k, phrase in enumerate(out["phrases"]):
        expected = instances.token_scores[k, columns[phrase]] / (1 + 1e-6)
        assert abs(float(instances.scores[k]) - float(expected)) < 1e-5
        assert int(instances.pred_classes[k]) == ["cat", "remote"].index(phrase)
    # Complete: every (box, phrase) pair above the threshold is there.
    every_query = predictor.settings.replace(box_threshold=-1.0)
    allq = predictor(image, caption, settings=every_query)["instances"].token_scores
    wanted = int((allq[:, [columns["cat"], columns["remote"]]] / (1 + 1e-6) > 0.55).sum())
    assert len(instances) == wanted


@pytest.mark.parametrize(
    "spans, message",
    [
        ([], "non-empty"),
        ([[[0, 3]], []], "phrase 1"),
        ([[[5, 99]]], "outside"),
        ([[[3, 3]]], "empty"),
        ([[[0, "a"]]], "not \\[beg, end\\]"),
    ],
)
def test_bad_token_spans(spans, message):
    with pytest.raises(ValueError, match=message):
        check_token_spans("a cat and a remote", spans)


def test_bad_inputs_raise_clear_errors(predictor):
    good = _image(0, 64, 64)
    cases = [
        (None, CAPTION, "image 0 is None"),
        (good[:, :, 0], CAPTION, "grayscale"),
        (np.zeros((64, 64, 4), np.uint8), CAPTION, "RGBA"),
        (good.astype(np.float32), CAPTION, "dtype float32"),
        (good[:8, :8], CAPTION, "smaller than"),
        (good, "   ", "blank"),
        (good, [], "class list is empty"),
        (good, ["cat", ""], "Class name 1"),
        (good, None, "prompt is None"),
    ]
    for image, prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            predictor(image, prompt)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        predictor.predict_batch([good, good], [CAPTION])
    with pytest.raises(ValueError, match="image 1"):
        predictor.predict_batch([good, None], CAPTION)


# ---------------------------------------------------------------- demo CLI
@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), _image(20, 100, 140))
    cv2.imwrite(str(folder / "b.png"), _image(21, 130, 90))
    (folder / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("ignored")
    return folder


THRESHOLD = 0.3


def _demo(*argv, **kwargs):
    """``python demo/demo.py ARGV`` as a user runs it."""
    command = [sys.executable, str(REPO / "demo" / "demo.py"), *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_demo_cli_folder_with_a_corrupt_file(converted, predictor, image_folder, tmp_path):
    out_dir, results = tmp_path / "drawn", tmp_path / "results.json"
    done = _demo(
        "--config-file",
        converted["lazy"],
        "--weights",
        converted["weights"],
        "--input",
        image_folder,
        "--prompt",
        "cat, remote control",
        "--output",
        out_dir,
        "--json",
        results,
        "--box-threshold",
        THRESHOLD,
    )
    assert done.returncode == 1, done.stderr  # one input failed, the others were processed
    assert "broken.jpg" in done.stderr and "cannot read" in done.stderr
    assert "3/3" in done.stderr  # the progress bar went over every file
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.jpg", "b.png"]
    drawn = cv2.imread(str(out_dir / "b.png"))  # lossless: differs only where boxes are drawn
    assert drawn.shape == (130, 90, 3)
    assert (np.abs(drawn.astype(int) - _image(21, 130, 90).astype(int)).max(-1) > 0).mean() > 0.02
    records = json.loads(results.read_text())
    assert records and {r["file_name"] for r in records} == {
        str(image_folder / "a.jpg"),
        str(image_folder / "b.png"),
    }
    for record in records:
        assert record["phrase"] in CLASSES and record["category_id"] in (0, 1)
        assert record["score"] > THRESHOLD and len(record["bbox"]) == 4 and record["bbox"][2] >= 0
    # The flags reach the settings: the predictor with --box-threshold and the default --nms.
    settings = predictor.settings.replace(box_threshold=THRESHOLD, nms_threshold=0.5)
    for name in ("a.jpg", "b.png"):
        path = str(image_folder / name)
        output = predictor(cv2.imread(path), CLASSES, settings=settings)
        mine = [r for r in records if r["file_name"] == path]
        assert [r["phrase"] for r in mine] == output["phrases"]
        np.testing.assert_allclose(
            [r["score"] for r in mine], output["instances"].scores.tolist(), atol=1e-5
        )


def test_demo_rec_and_token_spans(predictor, image_folder, tmp_path):
    paths = [str(image_folder / "a.jpg"), str(image_folder / "b.png")]
    rec_json = tmp_path / "rec.json"
    rec = predictor.settings.replace(rec=True)
    with JsonListWriter(str(rec_json)) as writer:
        detector = FileDetector(predictor, "the cat on the left", rec, json_writer=writer)
        assert detector.run(paths) == []
    records = json.loads(rec_json.read_text())
    assert [r["image_id"] for r in records] == [0, 1]  # exactly one box per image
    assert all(r["phrase"] == "the cat on the left" for r in records)

    spans_json = tmp_path / "spans.json"
    caption = "a cat and a remote"
    spans = parse_token_spans("[[[2,5]],[[12,18]]]", caption)
    with JsonListWriter(str(spans_json)) as writer:
        detector = FileDetector(predictor, caption, token_spans=spans, json_writer=writer)
        assert detector.run(paths) == []
    assert {r["phrase"] for r in json.loads(spans_json.read_text())} <= {"cat", "remote"}

    with pytest.raises(ValueError, match="outside"):
        parse_token_spans("[[[2,50]]]", "a cat")
    with pytest.raises(ValueError, match="not a list literal"):
        parse_token_spans("[[2,", "a cat")


def test_demo_yacs_config_and_missing_inputs(converted, image_folder, tmp_path):
    yacs_file = tmp_path / "thin.yaml"
    yacs_file.write_text(
        "MODEL:\n  META_ARCHITECTURE: GroundingDINO\n  DEVICE: cpu\n"
        f"  WEIGHTS: {converted['weights']}\n"
        f"  GROUNDING_DINO:\n    CONFIG_FILE: {converted['lazy']}\n    PROMPT: {CAPTION}\n"
    )
    out_file = tmp_path / "one.jpg"
    done = _demo(
        "--config-file",
        yacs_file,
        "--input",
        image_folder / "a.jpg",
        tmp_path / "missing*.jpg",
        "--output",
        out_file,
        "--opts",
        "MODEL.GROUNDING_DINO.BOX_THRESHOLD=0.6",
    )
    assert done.returncode == 1 and "missing*.jpg" in done.stderr
    assert out_file.is_file()

    spans = ["--prompt", "a cat", "--token-spans", "[[[2,50]]]"]
    done = _demo("--config-file", yacs_file, "--input", image_folder / "a.jpg", *spans)
    assert done.returncode == 2 and "outside" in done.stderr


def test_demo_video(predictor, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 72))
    for k in range(3):
        writer.write(_image(30 + k, 72, 96))
    writer.release()
    results, out_dir = tmp_path / "video.json", tmp_path / "drawn"
    paths, errors = expand_inputs([str(video)], extensions=VIDEO_EXTENSIONS)
    assert paths == [str(video)] and errors == []
    targets = plan_outputs(str(out_dir), [str(video)], paths)
    rec = predictor.settings.replace(rec=True)
    with JsonListWriter(str(results)) as json_writer:
        detector = FileDetector(
            predictor, "the cat on the left", rec, targets=targets, json_writer=json_writer
        )
        assert detector.run(paths) == []
    assert [r["frame"] for r in json.loads(results.read_text())] == [0, 1, 2]  # one box a frame
    capture = cv2.VideoCapture(str(out_dir / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()
