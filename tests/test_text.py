"""Text side: captions, tokenization, masks, positive maps, phrases and chunking, checked
against the official code (groundingdino) and transformers on generated captions; the prompt
encoder (the one tokeniser of the model, the mapper and post-processing) against them too."""

import random

import pytest
import torch

from grounding_dino.text import (
    SPECIAL_TOKENS,
    PromptEncoder,
    TokenizedText,
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
    sub_sentence_masks,
    swap_left_right,
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


def tokenize(tokenizer, captions):
    """The tokenizer called directly as the official code does: a padded batch truncated at
    256 tokens, with character offsets."""
    return tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=256,
        return_offsets_mapping=True,
        return_tensors="pt",
    )


# The official ``specical_tokens``: [CLS], [SEP], "." and "?" of the bert-base-uncased vocabulary.
OFFICIAL_SPECIAL_IDS = [101, 102, 1012, 1029]


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


def test_masks_match_official_and_transformers(tokenizer, captions):
    from groundingdino.models.GroundingDINO.bertwarper import generate_masks_with_special_tokens
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map as hf_masks,
    )

    specials = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
    assert specials == OFFICIAL_SPECIAL_IDS
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


def test_phrases_match_official_and_transformers(tokenizer, prompt_encoder, captions):
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
        assert prompt_encoder.phrases(scores, ids.tolist(), 0.25) == ours
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


# ------------------------------------------------------------------------------------------
# The prompt encoder, against the official code and the tokenizer called directly
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_encoder(minilm_dir):
    return PromptEncoder(tokenizer_name_or_path=minilm_dir, max_text_len=256)


def _official_text_inputs(tokenizer, captions, max_text_len=256):
    """The official model's text inputs (``GroundingDINO.forward``): tokenised whole and padded
    to the longest, masks built on the whole captions, then everything cut at max_text_len."""
    from groundingdino.models.GroundingDINO.bertwarper import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
    masks, positions, _ = generate_masks_with_special_tokens_and_transfer_map(
        tokenized, OFFICIAL_SPECIAL_IDS, tokenizer
    )
    cut = slice(0, max_text_len)
    return {
        "input_ids": tokenized["input_ids"][:, cut],
        "token_mask": tokenized["attention_mask"][:, cut].bool(),
        "token_type_ids": tokenized["token_type_ids"][:, cut],
        "self_attention_mask": masks[:, cut, cut],
        "position_ids": positions[:, cut],
    }


def test_special_tokens_close_phrases_and_runs_are_padded(prompt_encoder, tokenizer):
    """
    Proves what the special-token table does, not how it is spelt: in "a cat? a red dog."
    both "?" and "." close a phrase (the positions restart after each, and a phrase attends
    only to itself), with the official ids; a shorter run of a batch is padded with the
    tokenizer's pad id, masked out.
    """
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == OFFICIAL_SPECIAL_IDS
    assert prompt_encoder.special_token_ids == OFFICIAL_SPECIAL_IDS
    (run,) = prompt_encoder.runs_for_input(0, {"caption": "a cat? a red dog."})
    (short,) = prompt_encoder.runs_for_input(1, {"caption": "a cat."})
    tokens = prompt_encoder.batch([run, short])
    # [CLS] | a cat ? | a red dog . | [SEP]
    assert tokens.position_ids[0].tolist() == [0, 0, 1, 2, 0, 1, 2, 3, 0]
    attention = tokens.self_attention_mask[0]
    assert attention[1:4, 1:4].all() and attention[4:8, 4:8].all()
    assert not attention[1:4, 4:].any() and not attention[4:8, :4].any()
    assert tokens.input_ids.shape == (2, 9) and len(short.input_ids) == 5
    assert (tokens.input_ids[1, 5:] == tokenizer.pad_token_id).all()
    assert prompt_encoder.pad_token_id == tokenizer.pad_token_id
    assert tokens.token_mask[1, :5].all() and not tokens.token_mask[1, 5:].any()
    assert prompt_encoder.tokenizer is tokenizer  # the cached load_tokenizer
    with pytest.raises(ValueError, match="max_text_len"):
        PromptEncoder.from_tokenizer(tokenizer, max_text_len=2)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptEncoder(tokenizer_name_or_path="", max_text_len=256)


def test_prompt_encoder_pickles(prompt_encoder, tokenizer):
    import pickle

    again = pickle.loads(pickle.dumps(prompt_encoder))
    assert again.tokenizer is prompt_encoder.tokenizer  # reloaded from the cache, not pickled
    assert again.max_text_len == 256 and again.special_token_ids == OFFICIAL_SPECIAL_IDS
    wrapped = pickle.loads(pickle.dumps(PromptEncoder.from_tokenizer(tokenizer, max_text_len=9)))
    assert wrapped.max_text_len == 9
    (run,) = wrapped.runs_for_input(0, {"caption": "a cat"})
    assert run.input_ids == [101, 1037, 4937, 1012, 102]


def test_caption_runs_match_official_tokens(prompt_encoder, tokenizer, captions):
    from groundingdino.util.inference import preprocess_caption

    n_chunked = 0
    for caption in captions:
        official = tokenizer(preprocess_caption(caption))["input_ids"]
        runs = prompt_encoder.runs_for_input(3, {"caption": caption})
        assert all(run.image_index == 3 and run.category_indices is None for run in runs)
        assert all(run.positive_map is None for run in runs)
        if len(official) <= 256:
            assert len(runs) == 1 and runs[0].input_ids == official, caption
            assert runs[0].caption == normalize_caption(caption) and runs[0].phrase_offset == 0
            continue
        n_chunked += 1
        assert len(runs) > 1
        # The chunks' tokens are the caption's, split at phrase boundaries.
        assert [i for run in runs for i in run.input_ids[1:-1]] == official[1:-1]
        separators = 0
        for run in runs:
            assert run.input_ids == tokenizer(run.caption)["input_ids"]
            assert len(run.input_ids) <= 256 and run.caption.endswith(".")
            assert run.phrase_offset == separators
            separators += sum(i in (1012, 1029) for i in run.input_ids)
    assert n_chunked > 5


def test_batch_matches_official_model_inputs(prompt_encoder, tokenizer, captions):
    normalized = [normalize_caption(c) for c in captions]
    n_cut = 0
    for start in range(0, len(normalized), 8):
        batch = normalized[start : start + 8]
        # Whole captions (as the mapper's ids in training): the cut happens in batch().
        runs = [
            prompt_encoder.runs_for_input(
                i, {"caption": c, "input_ids": tokenizer(c)["input_ids"]}
            )[0]
            for i, c in enumerate(batch)
        ]
        ours = prompt_encoder.batch(runs)
        official = _official_text_inputs(tokenizer, batch)
        for name, expected in official.items():
            assert torch.equal(getattr(ours, name), expected), name
        n_cut += int(len(max(runs, key=lambda r: len(r.input_ids)).input_ids) > 256)
        # Chunked runs of the same captions: each fits, so nothing is cut.
        chunks = [run for c in batch for run in prompt_encoder.runs_for_input(0, {"caption": c})]
        ours = prompt_encoder.batch(chunks, device="cpu")
        official = _official_text_inputs(tokenizer, [run.caption for run in chunks])
        for name, expected in official.items():
            assert torch.equal(getattr(ours, name), expected), name
    assert n_cut > 3
    moved = ours.to("cpu")
    assert isinstance(moved, TokenizedText) and torch.equal(moved.input_ids, ours.input_ids)
    with pytest.raises(ValueError, match="at least one"):
        prompt_encoder.batch([])


def test_category_runs_match_official(prompt_encoder, tokenizer):
    from groundingdino.util.vl_utils import (
        build_captions_and_token_span,
        create_positive_map_from_span,
    )

    rng = random.Random(11)
    names = set()
    while len(names) < 700:
        names.add(" ".join(rng.choice(WORDS[:20]).lower() for _ in range(rng.randint(1, 3))))
    names = sorted(names)
    runs = prompt_encoder.runs_for_input(1, {"category_names": names})
    assert len(runs) > 3
    assert [i for run in runs for i in run.category_indices] == list(range(len(names)))
    for run in runs:
        group = [names[i] for i in run.category_indices]
        caption, spans = build_captions_and_token_span(group, True)
        encoded = tokenizer(caption)
        official = create_positive_map_from_span(encoded, [spans[n] for n in group])
        assert run.caption == caption and run.input_ids == encoded["input_ids"]
        assert run.image_index == 1 and run.phrase_offset == 0
        assert len(run.input_ids) <= 256
        assert torch.equal(run.positive_map, official)


def test_positive_map_is_the_truncated_official(prompt_encoder, tokenizer, captions):
    """The mapper's positive maps: the official map on the caption truncated at 256 tokens
    (the tokenizer keeps [SEP] last), from one whole tokenisation."""
    from groundingdino.util.vl_utils import create_positive_map_from_span

    rng = random.Random(2)
    n_long = n_boundary = 0
    for caption in captions:
        caption = normalize_caption(caption)
        encoding = prompt_encoder.tokenize(caption)
        spans = _random_spans(rng, caption)
        if len(encoding["input_ids"]) > 256:
            n_long += 1
            # Spans around the cut: tokens 250..258.
            offsets = encoding["offset_mapping"]
            for first, last in [(250, 254), (252, 256), (254, 255), (255, 258), (253, 253)]:
                spans.append([(offsets[first][0], offsets[last][1])])
                n_boundary += 1
        truncated = tokenizer(caption, truncation=True, max_length=256)
        official = create_positive_map_from_span(truncated, spans)
        assert torch.equal(prompt_encoder.positive_map(caption, spans, encoding), official)
        assert torch.equal(prompt_encoder.positive_map(caption, spans), official)
    assert n_long > 5 and n_boundary > 25


def test_token_helpers_match_token_strings(prompt_encoder, tokenizer, captions):
    non_words = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", ".", "?"}
    normalized = [normalize_caption(c) for c in captions[:60]] + ["🐱 cat ? [MASK] dog ."]
    n_unknown = 0
    for caption in normalized:
        ids = tokenizer(caption)["input_ids"] + [0, 0]  # with padding
        tokens = tokenizer.convert_ids_to_tokens(ids)
        ids = torch.tensor(ids)
        assert prompt_encoder.word_token_mask(ids).tolist() == [t not in non_words for t in tokens]
        expected, phrase = [], 0
        for token in tokens:
            expected.append(phrase)
            phrase += token in (".", "?")
        assert prompt_encoder.phrase_index_of_tokens(ids).tolist() == expected
        assert prompt_encoder.count_phrases(caption) == sum(t in (".", "?") for t in tokens)
        n_unknown += tokens.count("[UNK]")
    assert n_unknown > 0
    batched = torch.tensor([[101, 1037, 1012, 4937, 1029, 102], [101, 4937, 1012, 102, 0, 0]])
    assert prompt_encoder.phrase_index_of_tokens(batched).tolist() == [
        [0, 0, 0, 1, 1, 2],
        [0, 0, 0, 1, 1, 1],
    ]


def test_runs_for_input_errors(prompt_encoder, tokenizer):
    with pytest.raises(ValueError, match="Input 2: give 'caption' or 'category_names', not both"):
        prompt_encoder.runs_for_input(2, {"caption": "a", "category_names": ["b"]})
    with pytest.raises(ValueError, match="Input 0: no prompt"):
        prompt_encoder.runs_for_input(0, {})
    for bad in ([], "cat"):
        with pytest.raises(ValueError, match="non-empty list"):
            prompt_encoder.runs_for_input(0, {"category_names": bad})
    with pytest.raises(ValueError, match="empty or blank"):
        prompt_encoder.runs_for_input(0, {"caption": "  "})
    with pytest.raises(ValueError, match="Category 1"):
        prompt_encoder.runs_for_input(0, {"category_names": ["cat", "thermoregulation " * 300]})
    with pytest.raises(ValueError, match="501 tokens"):
        prompt_encoder.runs_for_input(0, {"caption": "a dog . " + "thermoregulation " * 100})
    ids = tokenizer("a cat .")["input_ids"]
    run = prompt_encoder.runs_for_input(0, {"caption": "a cat .", "input_ids": torch.tensor(ids)})
    assert run[0].input_ids == ids
    with pytest.raises(ValueError, match="not normalised"):
        prompt_encoder.runs_for_input(0, {"caption": "A cat", "input_ids": ids})
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        prompt_encoder.runs_for_input(0, {"caption": "a cat .", "input_ids": ids[1:]})
    with pytest.raises(ValueError, match="1-D"):
        prompt_encoder.runs_for_input(0, {"caption": "a cat .", "input_ids": torch.tensor([ids])})
