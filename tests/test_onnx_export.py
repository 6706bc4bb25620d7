"""ONNX export (``python -m grounding_dino.export onnx``) and the ONNX Runtime predictor.

One graph is exported per model and run at several image sizes and caption lengths: a size or
length traced into a constant would break one of them. Outputs are compared with the PyTorch
model on the same converted weights (transformers-format here, official-format in the slow
test) at the parity tolerances of tests/test_model_parity.py.
"""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from grounding_dino.deploy import OnnxPredictor, onnx_feeds
from grounding_dino.export import export_mode
from grounding_dino.export.cli import main as export_main
from grounding_dino.io.atomic import new_file_mode
from grounding_dino.modeling.deformable_attention import deformable_kernel
from grounding_dino.modeling.switches import tracing_mode
from grounding_dino.predictor import GroundingDINOPredictor
from grounding_dino.resize import OfficialResize

TOKEN_TOL = 1e-4
BOX_TOL_PX = 0.05
SIZES = [(97, 131), (160, 224)]  # odd and even feature sizes, neither the export's 203x317
CAPTIONS = [
    "a cat .",
    "the man on the left . a red car parked near the old bakery . what is this ? a cup of "
    "coffee on a wooden table . two dogs playing in the snow .",
]


def _export_cli(config, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "grounding_dino.export", "onnx", str(config), str(out), *extra],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def exported(converted_tiny, load_converted, tmp_path_factory):
    """The converted transformers-format tiny model, exported once by the CLI as a user would."""
    _, out_dir, _ = converted_tiny
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = _export_cli(out_dir / "config.yaml", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Wrote {path}" in result.stdout
    return path, out_dir / "config.yaml", load_converted(out_dir)


def _raw_outputs(session, model, image, runs):
    text = model.prompt_encoder.batch(runs)
    logits, boxes = session.run(None, onnx_feeds(image, text))
    with torch.no_grad():
        ref = model.forward_transformer([image], runs)
    return (torch.from_numpy(logits), torch.from_numpy(boxes)), (
        ref["pred_logits"],
        ref["pred_boxes"],
    )


def assert_graph_matches_model(session, model, sizes, captions):
    """Token scores within 1e-4 and boxes within 0.05 px at each size and caption; returns the
    largest differences seen (scores, px)."""
    worst = [0.0, 0.0]
    torch.manual_seed(0)
    for height, width in sizes:
        image = torch.randn(3, height, width)
        for caption in captions:
            runs = model.prompt_encoder.runs_for_input(0, {"caption": caption})
            (logits, boxes), (ref_logits, ref_boxes) = _raw_outputs(session, model, image, runs)
            assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
            token_diff = (logits.sigmoid() - ref_logits.sigmoid()).abs().max().item()
            scale = torch.tensor([width, height, width, height])
            box_diff = ((boxes - ref_boxes).abs() * scale).max().item()
            assert token_diff < TOKEN_TOL, f"{height}x{width} {caption!r}: scores {token_diff}"
            assert box_diff < BOX_TOL_PX, f"{height}x{width} {caption!r}: boxes {box_diff} px"
            # Padding columns stay -inf (score 0) in the graph too.
            length = len(runs[0].input_ids)
            assert torch.all(logits[..., length:] == float("-inf"))
            worst = [max(worst[0], token_diff), max(worst[1], box_diff)]
    return worst


def test_graph_equals_the_model_at_two_sizes_and_caption_lengths(exported):
    path, config, model = exported
    predictor = OnnxPredictor(str(path), str(config), threads=1)
    lengths = {len(model.prompt_encoder.tokenize(c)["input_ids"]) for c in CAPTIONS}
    assert len(lengths) == 2
    worst = assert_graph_matches_model(predictor.session, model, SIZES, CAPTIONS)
    print(f"transformers-format: max score diff {worst[0]:.2e}, max box diff {worst[1]:.2e} px")


def _assert_same_detections(ours, theirs):
    a, b = ours["instances"], theirs["instances"]
    assert len(a) == len(b) > 0
    assert ours["phrases"] == theirs["phrases"]
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert (a.scores - b.scores).abs().max() < TOKEN_TOL
    assert (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max() < BOX_TOL_PX
    assert a.image_size == b.image_size


@pytest.fixture(scope="module")
def predictors(exported):
    path, config, _ = exported
    knobs = ["model.box_threshold=0.0"]  # random weights: keep every query
    pair = (
        OnnxPredictor(str(path), str(config), overrides=knobs, threads=1),
        GroundingDINOPredictor.from_config_file(str(config), overrides=knobs),
    )
    for predictor in pair:  # small images keep the test fast (the default is 800 / 1333)
        predictor.resize = OfficialResize(160, 320)
    return pair


@pytest.mark.parametrize(
    "prompt",
    [
        CAPTIONS[1],
        ["cat", "remote control", "person on the left"],
        # 100 classes of 4 tokens: chunked into two runs of one graph call.
        [f"class {i} thing" for i in range(100)],
    ],
)
def test_onnx_predictor_returns_what_the_torch_predictor_returns(predictors, prompt):
    onnx_predictor, torch_predictor = predictors
    image = np.random.default_rng(1).integers(0, 255, (150, 230, 3), dtype=np.uint8)
    _assert_same_detections(onnx_predictor(image, prompt), torch_predictor(image, prompt))


def test_batch_and_rec_equal_the_torch_predictor(predictors):
    onnx_predictor, torch_predictor = predictors
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in [(120, 90, 3), (64, 200, 3)]]
    prompts = ["a cat . a dog .", ["car", "tree"]]
    for ours, theirs in zip(
        onnx_predictor.predict_batch(images, prompts),
        torch_predictor.predict_batch(images, prompts),
    ):
        _assert_same_detections(ours, theirs)
    rec = onnx_predictor.predict_rec(images[0], "the dog on the left")
    _assert_same_detections(rec, torch_predictor.predict_rec(images[0], "the dog on the left"))
    assert len(rec["instances"]) == 1


def test_onnx_predictor_runs_the_mask_stage_on_its_boxes(
    exported, predictors, tmp_path, monkeypatch
):
    """The PyTorch side of the ONNX predictor: ``mask_stage`` (here a folder) fills
    ``pred_masks`` from the graph's boxes, as the torch predictor does from its own."""
    from sam_reference import tiny_segmenter_folder

    path, config, _ = exported
    _, _, sam = tiny_segmenter_folder("sam", tmp_path / "sam", seed=8)
    onnx_predictor = OnnxPredictor(
        str(path), str(config), overrides=["model.box_threshold=0.0"], threads=1, mask_stage=sam
    )
    onnx_predictor.resize = OfficialResize(160, 320)
    torch_predictor = predictors[1]
    monkeypatch.setattr(torch_predictor, "mask_stage", onnx_predictor.mask_stage)
    image = np.random.default_rng(2).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    ours, theirs = onnx_predictor(image, ["cat", "dog"]), torch_predictor(image, ["cat", "dog"])
    _assert_same_detections(ours, theirs)
    masks = ours["instances"].pred_masks
    assert masks.shape == (len(ours["instances"]), 120, 90) and masks.any()
    direct = onnx_predictor.mask_stage(
        np.ascontiguousarray(image[:, :, ::-1]), ours["instances"].pred_boxes.tensor
    )
    assert torch.equal(masks, direct.masks)
    # Boxes equal to 0.05 px give masks equal but for a few boundary pixels.
    assert (masks != theirs["instances"].pred_masks).float().mean() < 1e-3


def test_onnx_predictor_refuses_a_config_that_does_not_match_the_graph(exported, tmp_path):
    path, config, _ = exported
    with pytest.raises(ValueError, match="max_text_len=256.*max_text_len is 128"):
        OnnxPredictor(str(path), str(config), overrides=["model.max_text_len=128"])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxPredictor(str(tmp_path / "missing.onnx"), str(config))


def test_cli_refuses_to_overwrite_and_names_missing_files(exported, tmp_path):
    _, config, _ = exported
    out = tmp_path / "existing.onnx"
    out.write_bytes(b"keep me")
    result = _export_cli(config, out)
    assert result.returncode == 1
    assert f"{out} exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = _export_cli(config, tmp_path / "new.onnx", "--weights", str(tmp_path / "nope.pth"))
    assert result.returncode == 1
    assert f"weights file {tmp_path / 'nope.pth'} does not exist" in result.stderr
    assert not (tmp_path / "new.onnx").exists()


def test_exported_file_has_a_new_files_mode_and_no_temporary_is_left(exported):
    path, _, _ = exported
    # mkstemp's 0600 would keep the model from other users whatever the umask says.
    assert stat.S_IMODE(os.stat(path).st_mode) == new_file_mode()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cli_errors_without_weights_or_config(exported, tmp_path, capsys):
    _, config, _ = exported
    assert export_main(["onnx", str(tmp_path / "no.yaml"), str(tmp_path / "a.onnx")]) == 1
    assert f"config file {tmp_path / 'no.yaml'} does not exist" in capsys.readouterr().err
    no_weights = ["onnx", str(config), str(tmp_path / "a.onnx"), "train.init_checkpoint="]
    assert export_main(no_weights) == 1
    assert "--random-weights" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_export_mode_equals_the_default_paths(exported):
    """The export-time switches (gather deformable kernel, shape-agnostic Swin forwards,
    tensor-sized level helpers) compute what the default paths compute, and are undone."""
    _, _, model = exported
    encoder = model.prompt_encoder
    runs = encoder.runs_for_input(0, {"caption": CAPTIONS[1]})
    image = torch.randn(3, 101, 139, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        default = model.forward_transformer([image], runs)
        with export_mode(model):
            kernels = {m.kernel for m in model.modules() if hasattr(m, "kernel")}
            exported_path = model.forward_transformer([image], runs)
    assert kernels == {"gather"}
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} == {"embedding_bag"}
    diff = (default["pred_logits"].sigmoid() - exported_path["pred_logits"].sigmoid()).abs()
    assert diff.max() < 1e-5
    assert (default["pred_boxes"] - exported_path["pred_boxes"]).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(61, 75), (64, 64), (113, 226)])
def test_swin_export_forwards_equal_detectron2s(exported, size):
    _, _, model = exported
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        default = model.backbone(images)
        with tracing_mode(model) as count:
            patched = model.backbone(images)
    assert count > 0
    assert not any("forward" in vars(m) for m in model.modules())
    for name in default:
        assert torch.allclose(default[name], patched[name], atol=1e-6), name


def test_deformable_kernel_is_restored_after_an_error(exported):
    _, _, model = exported
    with pytest.raises(RuntimeError):
        with deformable_kernel(model, "gather"):
            raise RuntimeError("boom")
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} == {"embedding_bag"}
    with pytest.raises(ValueError, match="kernel"):
        with deformable_kernel(model, "cuda"):
            pass


@pytest.mark.slow
def test_random_weights_export_only_on_request(exported, tmp_path):
    path, config, model = exported
    out = tmp_path / "random.onnx"
    result = _export_cli(config, out, "--random-weights")
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stderr
    real = OnnxPredictor(str(path), str(config))
    random = OnnxPredictor(str(out), str(config))
    image = torch.randn(3, 97, 131)
    runs = model.prompt_encoder.runs_for_input(0, {"caption": "a cat ."})
    (real_logits, _), _ = _raw_outputs(real.session, model, image, runs)
    (random_logits, _), _ = _raw_outputs(random.session, model, image, runs)
    assert (real_logits.sigmoid() - random_logits.sigmoid()).abs().max() > 0.01


@pytest.mark.slow
def test_graph_equals_the_model_on_an_official_format_checkpoint(
    tmp_path, minilm_dir, load_converted
):
    """The converted official-format model (Swin-T body), exported once by the CLI."""
    from test_model_parity import _official_model

    checkpoint = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": _official_model(minilm_dir).state_dict()}, checkpoint)
    command = [sys.executable, "-m", "grounding_dino.convert", "official", str(checkpoint)]
    result = subprocess.run(
        command + [str(tmp_path / "out"), "--tokenizer", minilm_dir], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = tmp_path / "out" / "config.yaml"
    result = _export_cli(config, tmp_path / "official.onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    predictor = OnnxPredictor(str(tmp_path / "official.onnx"), str(config), threads=2)
    model = load_converted(tmp_path / "out")
    worst = assert_graph_matches_model(predictor.session, model, [(128, 160), (97, 203)], CAPTIONS)
    print(f"official-format: max score diff {worst[0]:.2e}, max box diff {worst[1]:.2e} px")


def test_gather_kernel_equals_the_default_kernel():
    """The export kernel samples as the default one, corners outside the maps included."""
    from grounding_dino.modeling.deformable_attention import (
        ms_deform_attn_embedding_bag,
        ms_deform_attn_gather,
    )

    generator = torch.Generator().manual_seed(5)
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5], [1, 3]])
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 4, 8, generator=generator)
    locations = torch.rand(2, 50, 4, 4, 3, 2, generator=generator) * 1.6 - 0.3
    weights = torch.rand(2, 50, 4, 4, 3, generator=generator)
    expected = ms_deform_attn_embedding_bag(value, shapes, starts, locations, weights)
    result = ms_deform_attn_gather(value, shapes, starts, locations, weights)
    assert result.shape == expected.shape == (2, 50, 32)
    assert (result - expected).abs().max() < 1e-5
