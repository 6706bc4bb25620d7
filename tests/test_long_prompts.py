"""Prompts longer than one pass (256 tokens): class lists and captions are chunked."""

import pytest
import torch


@pytest.fixture(scope="module")
def model(converted_tiny, load_converted):
    _, out_dir, _ = converted_tiny
    return load_converted(out_dir, overrides=["model.box_threshold=0.0"])


def _image(seed=0):
    torch.manual_seed(seed)
    return (torch.rand(3, 96, 128) * 255).to(torch.uint8)


def test_long_class_list_is_chunked_and_indexes_the_whole_list(model):
    names = [f"object number {i}" for i in range(100)]
    caption_tokens = len(model.tokenizer(" . ".join(names) + " .")["input_ids"])
    assert caption_tokens > model.max_text_len  # really needs several passes
    image = _image()
    out = model([{"image": image, "category_names": names}])[0]
    classes = out["instances"].pred_classes
    assert len(out["instances"]) == model.max_detections
    assert int(classes.max()) < len(names)
    assert len(set(classes.tolist())) > 10  # classes from several chunks compete
    assert out["phrases"] == [names[int(c)] for c in classes]
    # Each chunk's scores equal a call with just that chunk's classes.
    from grounding_dino.text import chunk_categories

    chunks = chunk_categories(names, model.tokenizer, model.max_text_len)
    assert len(chunks) > 1
    first = chunks[0]
    alone = model([{"image": image, "category_names": [names[i] for i in first]}])[0]
    merged = out["instances"]
    in_first = torch.isin(merged.pred_classes, torch.tensor(first))
    top_merged = merged.scores[in_first][:20]
    assert torch.allclose(top_merged, alone["instances"].scores[:20], atol=1e-5)


def test_long_caption_is_split_at_phrases(model):
    phrases = [f"the thing number {i} on the table" for i in range(40)]
    caption = " . ".join(phrases) + " ."
    assert len(model.tokenizer(caption)["input_ids"]) > model.max_text_len
    out = model([{"image": _image(1), "caption": caption}])[0]
    classes = out["instances"].pred_classes
    assert len(classes) > 0 and int(classes.max()) < len(phrases)
    assert int(classes.max()) >= 20  # phrases of later chunks are indexed globally


def test_a_single_phrase_longer_than_the_limit_is_an_error(model):
    caption = " ".join(["word"] * 300) + " ."
    with pytest.raises(ValueError, match="token"):
        model([{"image": _image(2), "caption": caption}])


def test_empty_prompts_are_errors(model):
    for prompt in ({"caption": "   "}, {"category_names": []}, {}):
        with pytest.raises(ValueError):
            model([{"image": _image(3), **prompt}])
