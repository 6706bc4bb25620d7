"""The text encoder's cache of prompt-run features: exact reuse in eval mode without
gradients, an LRU bound, never in training, invalidated by any change of the weights, and
separate entries per autocast state; the predictor's outputs stay equal with the cache on."""

import numpy as np
import pytest
import torch

from grounding_dino.modeling.text_encoder import BertTextEncoder
from grounding_dino.predictor import GroundingDINOPredictor
from grounding_dino.text import PromptEncoder

from hf_reference import TINY_BERT

CLASSES = [f"object number {i} with a long name" for i in range(40)]  # several 256-token runs


def _encoder(cache_size: int) -> BertTextEncoder:
    return BertTextEncoder(
        name_or_path="unused",
        hidden_dim=16,
        pretrained=False,
        bert_config=TINY_BERT,
        bert_position_offset=1,
        freeze=False,
        cache_size=cache_size,
    ).eval()


@pytest.fixture(scope="module")
def prompt_encoder(minilm_dir):
    return PromptEncoder(tokenizer_name_or_path=minilm_dir, max_text_len=64)


@pytest.fixture()
def encoders():
    """(cached, uncached) encoders with the same weights."""
    torch.manual_seed(0)
    cached, plain = _encoder(8), _encoder(0)
    plain.load_state_dict(cached.state_dict())
    return cached, plain


def _tokens(prompt_encoder, prompts):
    runs = [
        run
        for index, prompt in enumerate(prompts)
        for run in prompt_encoder.runs_for_input(index, {"category_names": prompt})
    ]
    return prompt_encoder.batch(runs)


@torch.no_grad()
def test_repeated_and_mixed_batches_equal_the_uncached_encoder(encoders, prompt_encoder):
    cached, plain = encoders
    classes = _tokens(prompt_encoder, [CLASSES])
    runs = classes.input_ids.shape[0]
    assert 3 <= runs <= 8  # the class list is chunked; all runs fit in the cache
    first = cached(classes).features
    assert cached.cache_info() == {"hits": 0, "misses": runs, "size": runs, "max_size": 8}
    again = cached(classes).features
    assert cached.cache_info()["hits"] == runs and cached.cache_info()["misses"] == runs
    expected = plain(classes).features
    assert torch.equal(first, expected) and torch.equal(again, expected)
    # A batch of two images with the same list and one with a new one (padded to the same
    # length): the known runs come from the cache, the new one is encoded; same outputs.
    mixed = _tokens(prompt_encoder, [CLASSES, ["red cat", "dog"], CLASSES])
    assert mixed.input_ids.shape[1] == classes.input_ids.shape[1]
    assert torch.equal(cached(mixed).features, plain(mixed).features)
    # The returned features are a new tensor: changing them leaves the cache intact.
    again.add_(1.0)
    assert torch.equal(cached(classes).features, expected)


@torch.no_grad()
def test_the_cache_is_bounded_and_least_recently_used_goes_first(encoders, prompt_encoder):
    cached, _ = encoders
    batches = [_tokens(prompt_encoder, [[f"thing {i}"]]) for i in range(10)]
    for batch in batches:
        cached(batch)
    assert cached.cache_info()["size"] == 8
    hits = cached.cache_info()["hits"]
    cached(batches[-1])  # still cached
    assert cached.cache_info()["hits"] == hits + 1
    misses = cached.cache_info()["misses"]
    cached(batches[0])  # evicted
    assert cached.cache_info()["misses"] == misses + 1


def test_never_in_training_or_with_gradients(encoders, prompt_encoder):
    cached, _ = encoders
    tokens = _tokens(prompt_encoder, [["cat", "dog"]])
    cached(tokens)  # gradients enabled: no cache
    assert cached.cache_info()["size"] == 0
    with torch.no_grad():
        cached(tokens)
        assert cached.cache_info()["size"] == 1
        cached.train()
        assert cached.cache_info()["size"] == 0  # train() clears it
        cached(tokens)
        assert cached.cache_info()["size"] == 0


@torch.no_grad()
def test_changed_weights_are_never_served_stale_features(encoders, prompt_encoder):
    cached, plain = encoders
    tokens = _tokens(prompt_encoder, [["cat", "dog"]])
    cached(tokens)
    # In place, as an optimiser step or a manual edit would.
    for module in (cached, plain):
        module.feat_map.bias.add_(0.5)
    assert torch.equal(cached(tokens).features, plain(tokens).features)
    # Loading weights clears the cache.
    state = {k: v + 0.01 for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    cached.load_state_dict(state)
    assert cached.cache_info()["size"] == 0
    assert torch.equal(cached(tokens).features, plain(tokens).features)


@torch.no_grad()
def test_autocast_states_have_their_own_entries(encoders, prompt_encoder):
    cached, plain = encoders
    tokens = _tokens(prompt_encoder, [["cat", "dog"]])
    fp32 = cached(tokens).features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = cached(tokens).features
        expected = plain(tokens).features
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, expected)
    assert cached.cache_info()["size"] == 2


def test_bad_cache_size_is_refused():
    with pytest.raises(ValueError, match="cache_size must be an int >= 0, got -1"):
        _encoder(-1)


def test_predictor_outputs_are_equal_with_the_cache(converted_tiny):
    _, out_dir, _ = converted_tiny
    config = str(out_dir / "config.yaml")
    cached = GroundingDINOPredictor.from_config_file(
        config, overrides=["model.text_encoder.cache_size=8"]
    )
    plain = GroundingDINOPredictor.from_config_file(
        config, overrides=["model.text_encoder.cache_size=0"]
    )
    rng = np.random.default_rng(0)
    classes = [f"object number {i} with a long name" for i in range(60)]  # 2+ runs of 256
    for _ in range(2):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        a, b = cached(image, classes), plain(image, classes)
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)
        assert a["phrases"] == b["phrases"]
    info = cached.model.text_encoder.cache_info()
    assert info["misses"] >= 2 and info["hits"] == info["misses"]
    assert plain.model.text_encoder.cache_info()["size"] == 0


def test_cache_benchmark_tool_on_a_class_list(converted_tiny, tmp_path):
    """tools/benchmark_text_cache.py as a user runs it: equal outputs, a timed speed-up entry,
    cache hits on the repeated list, and a result file that is never overwritten."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    _, out_dir, _ = converted_tiny
    tool = Path(__file__).resolve().parents[1] / "tools" / "benchmark_text_cache.py"
    output = tmp_path / "cache.json"
    command = [sys.executable, str(tool), "--weights", str(out_dir / "model.pth")]
    command += ["--classes", "coco", "--images", "2", "--size", "96", "--runs", "1"]
    command += ["--threads", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["classes"] == 80 and report["images"] == 2
    assert report["outputs"]["equal_count"] and report["outputs"]["same_phrases"]
    assert report["outputs"].get("max_score_diff", 0.0) == 0.0
    assert report["cache"]["hits"] >= report["passes_per_image"] * 2
    assert report["speedup"] > 0
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "not overwritten" in again.stderr
    missing = subprocess.run(
        [sys.executable, str(tool), "--weights", str(tmp_path / "nope.pth")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "nope.pth does not exist" in missing.stderr
