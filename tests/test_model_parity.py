"""The model equals transformers' and the official Grounding DINO on the same weights."""

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

from grounding_dino.checkpoint import GroundingDINOCheckpointer
from grounding_dino.predictor import GroundingDINOPredictor
from grounding_dino.text import PromptRun, normalize_caption
from grounding_dino.text.tokenizer import load_tokenizer

TOKEN_TOL = 1e-4
BOX_TOL_PX = 0.05


@pytest.fixture(scope="module")
def hf_pair(converted_tiny, minilm_dir, load_converted):
    hf, out_dir, stdout = converted_tiny
    return hf, load_converted(out_dir), load_tokenizer(minilm_dir), stdout, out_dir


def _hf_forward(hf, tokenizer, images, captions):
    encoded = tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = hf(
            pixel_values=images,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            token_type_ids=encoded["token_type_ids"],
            pixel_mask=torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long),
        )
    return out.logits.sigmoid(), out.pred_boxes, encoded["input_ids"].shape[1]


def _ours_forward(model, images, captions):
    # One run per caption, taken as given (the official model does not normalise captions).
    encoder = model.prompt_encoder
    runs = [PromptRun(i, c, encoder.tokenize(c)["input_ids"]) for i, c in enumerate(captions)]
    with torch.no_grad():
        out = model.forward_transformer(list(images), runs)
    return out["pred_logits"].sigmoid(), out["pred_boxes"]


def _assert_close(ours, ref, length, image_size):
    (our_scores, our_boxes), (ref_scores, ref_boxes) = ours, ref
    token_diff = (our_scores[..., :length] - ref_scores[..., :length]).abs().max().item()
    height, width = image_size
    scale = torch.tensor([width, height, width, height])
    box_diff = ((our_boxes - ref_boxes).abs() * scale).max().item()
    assert token_diff < TOKEN_TOL, f"token scores differ by {token_diff}"
    assert box_diff < BOX_TOL_PX, f"boxes differ by {box_diff} px"
    # Columns past the caption are -inf in both (sigmoid 0).
    assert torch.all(our_scores[..., length:] == 0) and torch.all(ref_scores[..., length:] == 0)


def test_hf_checkpoint_converts_without_missing_or_unexpected_keys(hf_pair):
    *_, stdout, _ = hf_pair
    assert "missing keys: 0, unexpected keys: 0" in stdout


@pytest.mark.parametrize(
    "captions",
    [
        ["a cat . a remote control ."],
        ["what is on the table ? a cup . . ."],
        # A batch of two equal-size images with different captions (padded text).
        ["a cat . a dog .", "is there a person ? the man on the left . . a red car ."],
    ],
)
def test_matches_transformers_on_the_same_weights(hf_pair, captions):
    hf, model, tokenizer, *_ = hf_pair
    captions = [normalize_caption(c) for c in captions]
    torch.manual_seed(len(captions[0]))
    images = torch.randn(len(captions), 3, 96, 128)
    scores, boxes, length = _hf_forward(hf, tokenizer, images, captions)
    _assert_close(_ours_forward(model, images, captions), (scores, boxes), length, (96, 128))


def test_batch_of_different_sizes_equals_one_by_one(hf_pair):
    hf, model, tokenizer, *_ = hf_pair
    torch.manual_seed(3)
    sizes = [(96, 128), (128, 96), (70, 100)]
    images = [(torch.rand(3, h, w) * 255).to(torch.uint8) for h, w in sizes]
    prompts = [
        {"caption": "a cat . a remote control ."},
        {"category_names": ["dog", "traffic light", "person"]},
        {"caption": "the man on the left"},
    ]
    every_box = model.inference_settings.replace(box_threshold=0.0)
    inputs = [
        {"image": im, "height": im.shape[1], "width": im.shape[2], **p}
        for im, p in zip(images, prompts)
    ]
    batched = model.inference(inputs, settings=every_box)
    for record, together in zip(inputs, batched):
        alone = model.inference([record], settings=every_box)[0]
        a, b = alone["instances"], together["instances"]
        assert len(a) == len(b) > 0
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(a.token_scores, b.token_scores, atol=1e-5)
        assert alone["phrases"] == together["phrases"]
    # Each image alone also equals transformers on that image.
    for image, prompt in zip(images, prompts):
        if "caption" not in prompt:
            continue
        caption = normalize_caption(prompt["caption"])
        normalised = ((image.float() - model.pixel_mean) / model.pixel_std)[None]
        ref = _hf_forward(hf, tokenizer, normalised, [caption])
        ours = _ours_forward(model, normalised, [caption])
        _assert_close(ours, ref[:2], ref[2], image.shape[1:])


def test_category_prompt_scores_are_token_scores_through_positive_maps(hf_pair):
    _, model, *_ = hf_pair
    every_box = model.inference_settings.replace(box_threshold=0.0)
    image = (torch.rand(3, 96, 128) * 255).to(torch.uint8)
    names = ["cat", "remote control"]
    out = model.inference([{"image": image, "category_names": names}], settings=every_box)[0]
    instances = out["instances"]
    assert len(instances) == min(model.max_detections, 2 * model.query_selector.num_queries)
    # "remote control" spans two tokens (ids at 4, 5): its score is their mean.
    tokens = model.tokenizer("cat . remote control .")["input_ids"]
    assert tokens[1] != tokens[3]
    for score, cls, token_scores in zip(
        instances.scores, instances.pred_classes, instances.token_scores
    ):
        expected = token_scores[1] if cls == 0 else token_scores[3:5].mean()
        assert abs(float(score) - float(expected)) < 1e-5
    assert out["phrases"] == [names[int(c)] for c in instances.pred_classes]


def _official_model(minilm_dir):
    import groundingdino.config.GroundingDINO_SwinT_OGC as official_config
    from groundingdino.models.GroundingDINO.groundingdino import build_groundingdino

    fields = {k: getattr(official_config, k) for k in dir(official_config) if not k[0] == "_"}
    args = argparse.Namespace(**fields)
    args.update = None
    args.text_encoder_type = minilm_dir
    args.enc_layers, args.dec_layers, args.num_queries = 2, 2, 40
    args.use_checkpoint = args.use_transformer_ckpt = False
    torch.manual_seed(0)
    model = build_groundingdino(args).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02 + 0.005)
    return model


@pytest.mark.slow
def test_matches_the_official_code_on_an_official_format_checkpoint(
    tmp_path, minilm_dir, load_converted
):
    official = _official_model(minilm_dir)
    checkpoint = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": official.state_dict()}, checkpoint)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grounding_dino.convert",
            "official",
            str(checkpoint),
            str(tmp_path / "out"),
            "--tokenizer",
            minilm_dir,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing keys: 0, unexpected keys: 0" in result.stdout
    model = load_converted(tmp_path / "out")
    tokenizer = load_tokenizer(minilm_dir)
    torch.manual_seed(5)
    images = torch.randn(2, 3, 128, 160)
    # The official text self-attention repeats its [B, L, L] mask head-major for a
    # batch-major nn.MultiheadAttention, so in a batch of *different* captions it applies
    # one caption's mask to the other. Its batches are compared with equal captions, and
    # different captions one image at a time.
    cases = [
        (images, ["the man on the left . . a red car ."] * 2),
        (images[:1], ["a cat . a dog ?"]),
        (images[1:], ["what is this ? a cup ."]),
    ]
    for batch, captions in cases:
        with torch.no_grad():
            ref = official(batch, captions=captions)
        length = tokenizer(captions, padding="longest", return_tensors="pt")["input_ids"].shape[1]
        ours = _ours_forward(model, batch, captions)
        _assert_close(ours, (ref["pred_logits"].sigmoid(), ref["pred_boxes"]), length, (128, 160))


def test_not_a_checkpoint_gets_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_text("this is not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "grounding_dino.convert", "official", str(bad), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert str(bad) in result.stderr


def test_malicious_pickle_is_refused(tmp_path, hf_pair):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    _, model, *_ = hf_pair
    with pytest.raises(ValueError, match="evil.pth"):
        GroundingDINOCheckpointer(model).load(str(path))


@pytest.fixture(scope="module")
def predictor(hf_pair):
    *_, out_dir = hf_pair
    return GroundingDINOPredictor.from_config_file(str(out_dir / "config.yaml"))


@pytest.mark.parametrize(
    "image, prompt, message",
    [
        (np.zeros((64, 64, 3), np.uint8), "", "empty"),
        (np.zeros((64, 64, 3), np.uint8), "   ", "blank"),
        (np.zeros((64, 64, 3), np.uint8), [], "empty"),
        (np.zeros((64, 64, 3), np.uint8), None, "None"),
        (np.zeros((64, 64), np.uint8), "cat", "grayscale"),
        (np.zeros((64, 64, 4), np.uint8), "cat", "RGBA"),
        (np.zeros((64, 64, 3), np.float32), "cat", "float32"),
        (np.zeros((16, 64, 3), np.uint8), "cat", "smaller"),
        (None, "cat", "None"),
    ],
)
def test_bad_input_gets_a_clear_value_error(predictor, image, prompt, message):
    with pytest.raises(ValueError, match=message):
        predictor(image, prompt)
