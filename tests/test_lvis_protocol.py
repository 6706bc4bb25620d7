"""The LVIS protocol choice: ``model.prompt_encoder.classes_per_prompt`` changes how a category
list is chunked (None: as many classes as fit in 256 tokens; 40: mmdetection's) and nothing
else."""

import pytest
import torch
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from omegaconf import OmegaConf

from grounding_dino.model_zoo import get_config
from grounding_dino.text import PromptEncoder, caption_from_categories, chunk_categories
from grounding_dino.text.captions import clean_category_name
from grounding_dino.text.tokenizer import count_tokens

# The class names as the evaluation prompts them ("aerosol_can" -> "aerosol can").
LVIS_NAMES = [
    clean_category_name(c["name"]) for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
]


@pytest.fixture(scope="module")
def encoders(minilm_dir):
    return {
        n: PromptEncoder(tokenizer_name_or_path=minilm_dir, max_text_len=256, classes_per_prompt=n)
        for n in (None, 40, 2000)
    }


def test_default_fills_256_tokens_and_40_gives_blocks_of_40(encoders):
    tokenizer = encoders[None].tokenizer
    default = chunk_categories(LVIS_NAMES, tokenizer, 256)
    forty = chunk_categories(LVIS_NAMES, tokenizer, 256, classes_per_prompt=40)
    for chunks in (default, forty):  # every class once, in order
        assert [i for chunk in chunks for i in chunk] == list(range(1203))
    # As today: each chunk is as long as 256 tokens allow (one more class would not fit).
    for chunk in default[:-1]:
        longer = caption_from_categories(LVIS_NAMES[chunk[0] : chunk[-1] + 2])[0]
        assert count_tokens(tokenizer, longer) > 256
    assert [len(c) for c in forty] == [40] * 30 + [3]  # mmdetection's chunks of 40
    assert len(default) == 14 and len(forty) == 31
    for chunk in forty:
        caption = caption_from_categories([LVIS_NAMES[i] for i in chunk])[0]
        assert count_tokens(tokenizer, caption) <= 256
    with pytest.raises(ValueError, match="classes_per_prompt must be at least 1, got 0"):
        chunk_categories(LVIS_NAMES, tokenizer, 256, classes_per_prompt=0)


def _runs(encoder, names):
    return encoder.runs_for_input(0, {"category_names": names})


def test_runs_with_40_are_the_default_runs_of_each_block_of_40(encoders):
    """The setting only regroups the classes: the runs with 40 classes per prompt are exactly
    the default runs of each block of 40 (same captions, tokens, positive maps; category
    indices shifted to the block's place)."""
    names = LVIS_NAMES[:130]
    runs = _runs(encoders[40], names)
    expected = []
    for start in range(0, len(names), 40):
        for run in _runs(encoders[None], names[start : start + 40]):
            run.category_indices = [start + i for i in run.category_indices]
            expected.append(run)
    assert len(runs) == len(expected) == 4
    for ours, reference in zip(runs, expected):
        assert ours.caption == reference.caption
        assert ours.input_ids == reference.input_ids
        assert ours.category_indices == reference.category_indices
        assert torch.equal(ours.positive_map, reference.positive_map)
    # A limit above the list's chunks changes nothing; captions are not affected by it.
    for a, b in zip(_runs(encoders[2000], LVIS_NAMES), _runs(encoders[None], LVIS_NAMES)):
        assert (a.caption, a.input_ids, a.category_indices) == (
            b.caption,
            b.input_ids,
            b.category_indices,
        )
    caption = {"caption": " . ".join(LVIS_NAMES[:200])}
    assert [r.input_ids for r in encoders[40].runs_for_input(0, caption)] == [
        r.input_ids for r in encoders[None].runs_for_input(0, caption)
    ]


def test_lvis_config_override_changes_only_the_chunking_key():
    default = get_config("zeroshot_lvis_swin_t.py")
    mmdet = get_config("zeroshot_lvis_swin_t.py", ["model.prompt_encoder.classes_per_prompt=40"])

    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    a = flat(OmegaConf.to_container(default, resolve=False))
    b = flat(OmegaConf.to_container(mmdet, resolve=False))
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {
        "model.prompt_encoder.classes_per_prompt"
    }
    assert a["model.prompt_encoder.classes_per_prompt"] is None
    assert b["model.prompt_encoder.classes_per_prompt"] == 40
