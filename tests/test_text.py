"""Text side: captions, tokenization, masks, positive maps, phrases and chunking, checked
against the official code (groundingdino) and transformers on generated captions."""

import random

import pytest
import torch

from grounding_dino.text import (
    caption_from_categories,
    chunk_caption,
    chunk_categories,
    count_tokens,
    load_tokenizer,
    normalize_caption,
    normalize_caption_with_spans,
    phrases_from_token_scores,
    positive_map_from_spans,
    positive_maps_from_spans,
    special_token_ids,
    sub_sentence_masks,
    swap_left_right,
    tokenize,
)

WORDS = [
    "cat",
    "dog",
    "traffic",
    "light",
    "the",
    "a",
    "Person",
    "left",
    "right",
    "café",
    "naïve",
    "Zürich",
    "crème",
    "brûlée",
    "東京",
    "🐱",
    "thermoregulation",
    "unbelievably",
    "electroencephalography",
    "skateboarding",
    "hot-dog",
    "o'clock",
    "x-ray",
    "ﬁsh",
    "İstanbul",
    "ß",
    "über",
    "Ωmega",
    "  ",
    "TV",
    "remote",
    "12",
    "3.5",
]
SEPARATORS = [" . ", ". ", " ? ", "? ", " .. ", "... ", " . . ", ".", " , ", " "]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _random_caption(rng: random.Random) -> str:
    n_phrases = rng.choice([1, 2, 3, 5, 8, 150])  # 150 phrases: over 256 tokens
    parts = []
    for _ in range(n_phrases):
        n_words = rng.randint(0, 4)  # 0 words: an empty phrase
        parts.append(" ".join(rng.choice(WORDS) for _ in range(n_words)))
        parts.append(rng.choice(SEPARATORS))
    caption = "".join(parts)
    if rng.random() < 0.5:
        caption = caption.rstrip(" .?")
    return caption if caption.strip() else "cat"


def _random_spans(rng: random.Random, caption: str):
    """Word spans, multi-word spans and spans starting/ending on spaces (official fallbacks)."""
    spans = []
    for _ in range(rng.randint(0, 5)):
        obj = []
        for _ in range(rng.randint(1, 2)):
            beg = rng.randrange(len(caption))
            end = rng.randint(beg + 1, min(len(caption), beg + 25))
            obj.append((beg, end))
        spans.append(obj)
    return spans


@pytest.fixture(scope="module")
def captions():
    rng = random.Random(0)
    return [_random_caption(rng) for _ in range(240)]


def test_normalize_caption():
    assert normalize_caption("  A Cat ") == "a cat ."
    assert normalize_caption("Cat. Dog.") == "cat. dog."
    assert normalize_caption("what?") == "what? ."
    for bad in [None, "", "   \n", 3]:
        with pytest.raises(ValueError):
            normalize_caption(bad)


def test_normalize_same_tokens_as_official(tokenizer, captions):
    from groundingdino.util.inference import preprocess_caption

    for caption in captions:
        ours = tokenizer(normalize_caption(caption))["input_ids"]
        official = tokenizer(preprocess_caption(caption))["input_ids"]
        assert ours == official, caption


def test_normalize_caption_with_spans():
    caption = "  The LEFT Dog İs here"
    words = ["The", "LEFT", "Dog", "here"]
    spans = [[(caption.index(w), caption.index(w) + len(w))] for w in words]
    normalized, new_spans = normalize_caption_with_spans(caption, spans)
    assert normalized == normalize_caption(caption)
    assert [normalized[b:e] for ((b, e),) in new_spans] == [w.lower() for w in words]
    with pytest.raises(ValueError, match="outside its caption"):
        normalize_caption_with_spans("cat", [[(0, 9)]])


def test_swap_left_right():
    caption = "the left dog right of a leftmost bright cat on the left ."
    spans = [[(4, 12)], [(13, 18)], [(24, 32)], [(33, 39)], [(51, 55)]]
    new, new_spans = swap_left_right(caption, spans)
    assert new == "the right dog left of a rightmost bright cat on the right ."
    assert [new[b:e] for ((b, e),) in new_spans] == [
        "right dog",
        "left",
        "rightmost",
        "bright",
        "right",
    ]
    back, back_spans = swap_left_right(new, new_spans)
    assert back == caption and back_spans == spans


def test_special_token_ids(tokenizer):
    assert special_token_ids(tokenizer) == [101, 102, 1012, 1029]


def test_tokenize_pads_truncates_offsets(tokenizer):
    long_caption = normalize_caption(" . ".join(["thermoregulation"] * 100))
    encoded = tokenize(tokenizer, ["a cat .", long_caption])
    assert encoded["input_ids"].shape == (2, 256)
    assert encoded["input_ids"][1, -1].item() == 102  # [SEP] kept at the cut
    assert encoded["attention_mask"][0].sum().item() == 5
    assert encoded["offset_mapping"].shape == (2, 256, 2)
    assert encoded.char_to_token(0, 2) == 2
    with pytest.raises(TypeError):
        tokenize(tokenizer, "a cat .")


def test_masks_match_official_and_transformers(tokenizer, captions):
    from groundingdino.models.GroundingDINO.bertwarper import generate_masks_with_special_tokens
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map as hf_masks,
    )

    specials = special_token_ids(tokenizer)
    normalized = [normalize_caption(c) for c in captions]
    n_truncated = 0
    for start in range(0, len(normalized), 8):  # batches with padding
        encoded = tokenize(tokenizer, normalized[start : start + 8])
        n_truncated += int((encoded["attention_mask"].sum(1) == 256).sum())
        mask, positions = sub_sentence_masks(encoded["input_ids"], specials)
        official_mask, official_positions = generate_masks_with_special_tokens(
            encoded, specials, tokenizer
        )
        hf_mask, hf_positions = hf_masks(encoded["input_ids"])
        assert torch.equal(mask, official_mask) and torch.equal(positions, official_positions)
        assert torch.equal(mask, hf_mask) and torch.equal(positions, hf_positions)
    assert n_truncated > 5  # the generator does reach the 256-token cut


def test_positive_maps_match_official(tokenizer, captions):
    from groundingdino.util.vl_utils import create_positive_map_from_span

    rng = random.Random(1)
    normalized = [normalize_caption(c) for c in captions]
    all_spans = [_random_spans(rng, c) for c in normalized]
    n_objects = n_fallback = 0
    for start in range(0, len(normalized), 8):
        batch = normalized[start : start + 8]
        spans = all_spans[start : start + 8]
        encoded = tokenize(tokenizer, batch)
        batched = positive_maps_from_spans(encoded, spans, captions=batch)
        for caption, obj_spans, ours_batched in zip(batch, spans, batched):
            single = tokenize(tokenizer, [caption])
            official = create_positive_map_from_span(single, obj_spans)
            ours = positive_map_from_spans(single, obj_spans, caption=caption)
            assert ours.shape == (len(obj_spans), 256)
            assert torch.equal(ours, official), (caption, obj_spans)
            assert torch.equal(ours_batched, official)
            n_objects += len(obj_spans)
            n_fallback += sum(single.char_to_token(b) is None for obj in obj_spans for b, _ in obj)
    assert n_objects > 400 and n_fallback > 20


def test_positive_map_rows_and_errors(tokenizer):
    caption, spans = caption_from_categories(["cat", "traffic light", "electroencephalography"])
    encoded = tokenize(tokenizer, [caption])
    pmap = positive_map_from_spans(encoded, spans, caption=caption)
    tokens = encoded.tokens(0)
    assert [tokens[i] for i in pmap[1].nonzero().flatten()] == ["traffic", "light"]
    assert len(pmap[2].nonzero()) > 2  # several word pieces
    assert torch.allclose(pmap.sum(1), torch.ones(3), atol=1e-5)
    unbatched = tokenizer(caption, return_offsets_mapping=True)  # no tensors, no batch
    assert torch.equal(positive_map_from_spans(unbatched, spans, caption=caption), pmap)
    with pytest.raises(ValueError, match=r"\[3, 80\)"):
        positive_map_from_spans(encoded, [[(3, 80)]], caption=caption)
    with pytest.raises(ValueError, match=r"\[5, 5\)"):
        positive_map_from_spans(encoded, [[(5, 5)]])


def test_phrases_match_official_and_transformers(tokenizer, captions):
    from groundingdino.util.utils import get_phrases_from_posmap
    from transformers.models.grounding_dino.processing_grounding_dino import (
        get_phrases_from_posmap as hf_phrases,
    )

    gen = torch.Generator().manual_seed(0)
    special = {101, 102, 0}
    n_nonempty = 0
    for caption in captions[:200]:
        caption = normalize_caption(caption)
        encoded = tokenize(tokenizer, [caption])
        ids = encoded["input_ids"][0]
        scores = torch.rand(6, 256, generator=gen) ** 3  # padded to 256 as the model does
        ours = phrases_from_token_scores(scores, ids, tokenizer, 0.25)
        length = len(ids)
        keep = scores[:, :length] > 0.25
        is_special = torch.tensor([int(i) in special for i in ids])
        official = [
            get_phrases_from_posmap(
                row & ~is_special, {"input_ids": ids.tolist()}, tokenizer
            ).replace(".", "")
            for row in keep
        ]
        hf = [tokenizer.decode(t).replace(".", "") for t in hf_phrases(keep, ids)]
        assert ours == official == hf, caption
        n_nonempty += sum(bool(p.strip()) for p in ours)
    assert n_nonempty > 300


def test_caption_from_categories_matches_official():
    from groundingdino.util.vl_utils import build_captions_and_token_span

    names = ["Person", "traffic light", "hot dog", "café table", "teddy  bear", "x-ray"]
    caption, spans = caption_from_categories(names)
    official_caption, official_spans = build_captions_and_token_span(names, True)
    assert (
        caption == official_caption == "person . traffic light . hot dog . café table . "
        "teddy bear . x-ray ."
    )
    for name, obj in zip(names, spans):
        assert [list(s) for s in obj] == official_spans[name.lower()]

    rng = random.Random(3)
    shuffled, shuffled_spans = caption_from_categories(names, shuffle=True, rng=rng)
    assert shuffled != caption and shuffled.endswith(" .")
    for name, obj in zip(names, shuffled_spans):
        assert " ".join(shuffled[b:e] for b, e in obj) == " ".join(name.lower().split())
    for bad in [[], ["cat", ""], ["cat", "  "], [None]]:
        with pytest.raises(ValueError):
            caption_from_categories(bad)


def test_chunk_categories(tokenizer):
    rng = random.Random(5)
    names = [
        " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(1, 3))) for _ in range(1203)
    ]
    names = [n if n.strip() else "cat" for n in names]
    groups = chunk_categories(names, tokenizer)
    assert [i for g in groups for i in g] == list(range(len(names)))
    for k, group in enumerate(groups):
        caption, _ = caption_from_categories([names[i] for i in group])
        assert count_tokens(tokenizer, caption) <= 256
        if k + 1 < len(groups):  # greedy: the next name would not fit
            longer, _ = caption_from_categories([names[i] for i in group + [groups[k + 1][0]]])
            assert count_tokens(tokenizer, longer) > 256
    assert len(groups) > 10
    assert chunk_categories(["cat", "dog"], tokenizer) == [[0, 1]]
    with pytest.raises(ValueError, match="Category 1"):
        chunk_categories(["cat", "thermoregulation " * 100], tokenizer)


def test_chunk_caption(tokenizer):
    rng = random.Random(7)
    phrases = [
        " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(1, 6))) for _ in range(200)
    ]
    caption = normalize_caption(" . ".join(phrases) + " ? what .. ok")
    chunks = chunk_caption(caption, tokenizer)
    assert len(chunks) > 1
    for text, offset in chunks:
        assert caption[offset : offset + len(text)] == text
        assert count_tokens(tokenizer, text) <= 256
        assert text.endswith(".") and normalize_caption(text) == text
    covered = "".join(text for text, _ in chunks).replace(" ", "")
    assert covered == caption.replace(" ", "")
    assert chunk_caption("a cat .", tokenizer) == [("a cat .", 0)]
    long_phrase = "a dog . " + "thermoregulation " * 100 + ". cat ."
    with pytest.raises(ValueError, match=r"character 8 .* 501 tokens"):
        chunk_caption(long_phrase, tokenizer)


@pytest.mark.parametrize(
    "name, cleaned",
    [
        ("person", "person"),
        ("traffic light", "traffic light"),
        ("aerosol_can", "aerosol can"),
        ("bow_(weapon)", "bow"),
        ("cover_(for_a_book)", "cover"),
        ("(odd)", "(odd)"),
    ],
)
def test_category_names_are_cleaned_for_prompts(name, cleaned):
    from grounding_dino.text import clean_category_name

    assert clean_category_name(name) == cleaned
