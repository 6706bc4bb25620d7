"""The mask stage in ``GroundingDINOPredictor``: the ``mask_stage`` argument and the config
node fill ``pred_masks`` with what the stage gives on the predictor's own boxes; without them
nothing changes and the segment package is not even imported."""

import sys

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from sam_reference import tiny_segmenter_folder

from grounding_dino import GroundingDINOPredictor
from grounding_dino.model_zoo import get_config
from grounding_dino.segment import MaskStage

CLASSES = ["red square", "blue circle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """The shapes_tiny config, its random weights saved, and a tiny SAM folder."""
    root = tmp_path_factory.mktemp("predictor_masks")
    weights = root / "model.pth"
    torch.save({"model": tiny_model.state_dict()}, weights)
    _, _, sam = tiny_segmenter_folder("sam", root / "sam", seed=7)
    return {"weights": str(weights), "sam": sam}


def _images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (96, 128, 3), dtype=np.uint8),
        rng.integers(0, 255, (80, 64, 3), dtype=np.uint8),
    ]


def test_predictor_fills_masks_from_its_boxes(setup):
    stage = MaskStage.from_pretrained(setup["sam"], box_batch_size=4)
    predictor = GroundingDINOPredictor(
        get_config("shapes_tiny.py"), weights=setup["weights"], device="cpu", mask_stage=stage
    )
    loose = predictor.settings.replace(box_threshold=0.0, max_detections=6)
    images = _images()
    outputs = predictor.predict_batch(images, [CLASSES, CLASSES], settings=loose)
    single = predictor(images[0], CLASSES, settings=loose)
    for image, output in zip(images, outputs):
        instances = output["instances"]
        assert len(instances) > 0
        assert instances.pred_masks.shape == (len(instances), *image.shape[:2])
        assert instances.pred_masks.dtype == torch.bool
        # The predictor takes BGR: the stage sees the RGB image and the predictor's boxes.
        direct = stage(np.ascontiguousarray(image[:, :, ::-1]), instances.pred_boxes.tensor)
        assert torch.equal(instances.pred_masks, direct.masks)
        assert torch.equal(instances.mask_scores, direct.scores)
    assert torch.equal(single["instances"].pred_masks, outputs[0]["instances"].pred_masks)
    # No boxes: an empty mask tensor, not an error.
    none = predictor(images[1], CLASSES, settings=loose.replace(box_threshold=1.0))
    assert none["instances"].pred_masks.shape == (0, 80, 64)


def test_config_node_and_path_build_the_stage(setup, tmp_path):
    cfg = get_config("shapes_tiny.py")
    cfg.mask_stage = L(MaskStage.from_pretrained)(path=setup["sam"], box_batch_size=3)
    LazyConfig.save(cfg, str(tmp_path / "with_masks.yaml"))  # the node survives a save/load
    cfg = LazyConfig.load(str(tmp_path / "with_masks.yaml"))
    predictor = GroundingDINOPredictor(cfg, weights=setup["weights"], device="cpu")
    assert predictor.mask_stage.kind == "sam" and predictor.mask_stage.box_batch_size == 3
    assert predictor.mask_stage.dtype == predictor.dtype  # left out of the node: the predictor's
    loose = predictor.settings.replace(box_threshold=0.0, max_detections=3)
    assert predictor(_images()[0], CLASSES, settings=loose)["instances"].has("pred_masks")
    by_path = GroundingDINOPredictor(
        get_config("shapes_tiny.py"),
        weights=setup["weights"],
        device="cpu",
        mask_stage=setup["sam"],
    )
    assert isinstance(by_path.mask_stage, MaskStage)
    cfg.mask_stage = L(MaskStage.from_pretrained)(path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        GroundingDINOPredictor(cfg, weights=setup["weights"], device="cpu")


def test_without_a_stage_nothing_changes_and_nothing_is_loaded(setup, monkeypatch):
    # Any import of the segment package (or transformers' SAM) would now raise ImportError.
    for name in ("grounding_dino.segment", "transformers.models.sam"):
        monkeypatch.setitem(sys.modules, name, None)
    predictor = GroundingDINOPredictor(
        get_config("shapes_tiny.py"), weights=setup["weights"], device="cpu"
    )
    assert predictor.mask_stage is None
    out = predictor(_images()[0], CLASSES, settings=predictor.settings.replace(box_threshold=0.0))
    assert not out["instances"].has("pred_masks") and len(out["instances"]) > 0
