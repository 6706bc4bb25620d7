"""The BERT text encoder: the official text path (transformers' BERT on the official
sub-sentence inputs), the BERT position offset, frozen = eval, the registry."""

import pytest
import torch
from hf_reference import TINY_BERT

from grounding_dino.modeling import build_text_encoder
from grounding_dino.modeling.structures import EncodedText
from grounding_dino.modeling.text_encoder import BertTextEncoder
from grounding_dino.text import PromptEncoder, normalize_caption


def _encoder(name_or_path, **kwargs):
    args = dict(
        name_or_path=name_or_path,
        hidden_dim=32,
        pretrained=True,
        bert_config=None,
        bert_position_offset=0,
        freeze=False,
    )
    args.update(kwargs)
    return BertTextEncoder(**args)


@pytest.fixture(scope="module")
def prompt_encoder(minilm_dir):
    return PromptEncoder(tokenizer_name_or_path=minilm_dir, max_text_len=256)


def test_features_equal_the_official_text_path(minilm_dir, prompt_encoder):
    """The official ``GroundingDINO.forward`` text path, written out with transformers' BERT:
    tokenise whole, official masks, cut at 256, BERT with the sub-sentence mask and position
    ids, then ``feat_map``."""
    from groundingdino.models.GroundingDINO.bertwarper import (
        generate_masks_with_special_tokens_and_transfer_map,
    )
    from transformers import AutoModel

    torch.manual_seed(0)
    encoder = _encoder(minilm_dir).eval()
    bert = AutoModel.from_pretrained(minilm_dir, add_pooling_layer=False).eval()
    tokenizer = prompt_encoder.tokenizer
    captions = [
        normalize_caption("a red circle. the blue square? left shoe"),
        normalize_caption(" . ".join(["thermoregulation x"] * 60)),  # over 256 tokens: cut
        "cat .",
    ]
    runs = [
        prompt_encoder.runs_for_input(i, {"caption": c, "input_ids": tokenizer(c)["input_ids"]})[0]
        for i, c in enumerate(captions)
    ]
    with torch.no_grad():
        ours = encoder(prompt_encoder.batch(runs))
        tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
        masks, positions, _ = generate_masks_with_special_tokens_and_transfer_map(
            tokenized, [101, 102, 1012, 1029], tokenizer
        )
        assert tokenized["input_ids"].shape[1] > 256
        cut = slice(0, 256)
        hidden = bert(
            input_ids=tokenized["input_ids"][:, cut],
            attention_mask=masks[:, cut, cut],
            token_type_ids=tokenized["token_type_ids"][:, cut],
            position_ids=positions[:, cut],
        ).last_hidden_state
        expected = encoder.feat_map(hidden)
    assert isinstance(ours, EncodedText) and ours.features.shape == (3, 256, 32)
    torch.testing.assert_close(ours.features, expected, rtol=0, atol=1e-6)
    assert torch.equal(ours.self_attention_mask, masks[:, cut, cut])
    assert torch.equal(ours.position_ids, positions[:, cut])
    assert torch.equal(ours.token_mask, tokenized["attention_mask"][:, cut].bool())
    assert torch.equal(ours.input_ids, tokenized["input_ids"][:, cut])


def test_position_offset_changes_only_berts_positions(minilm_dir, prompt_encoder):
    torch.manual_seed(0)
    plain = _encoder(minilm_dir).eval()
    shifted = _encoder(minilm_dir, bert_position_offset=1).eval()
    shifted.feat_map.load_state_dict(plain.feat_map.state_dict())
    runs = [
        run
        for i, caption in enumerate(["red circle . blue circle .", "a cat ."])
        for run in prompt_encoder.runs_for_input(i, {"caption": caption})
    ]
    tokens = prompt_encoder.batch(runs)
    with torch.no_grad():
        a, b = plain(tokens), shifted(tokens)
    # The official position ids (each phrase restarts at 0) reach the enhancer unchanged.
    assert a.position_ids.tolist()[0] == [0, 0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(b.position_ids, a.position_ids)
    assert torch.equal(b.self_attention_mask, a.self_attention_mask)

    # The first word of each phrase no longer shares [CLS]'s position: "red" and "blue"
    # (tokens 1 and 4) become much more different.
    def cosine(features):
        return torch.cosine_similarity(features[0, 1], features[0, 4], dim=0).item()

    assert cosine(b.features) < cosine(a.features) - 0.1
    with pytest.raises(ValueError, match="bert_position_offset"):
        _encoder(minilm_dir, bert_position_offset=-1)


def test_a_frozen_text_encoder_stays_in_eval_mode(minilm_dir):
    frozen = _encoder(minilm_dir, freeze=True).train()
    assert frozen.training and frozen.feat_map.training
    assert not frozen.bert.training
    assert not any(p.requires_grad for p in frozen.bert.parameters())
    assert frozen.feat_map.weight.requires_grad
    trained = _encoder(minilm_dir).train()
    assert trained.bert.training and all(p.requires_grad for p in trained.parameters())
    trained.eval()
    assert not trained.bert.training


def test_built_by_name_from_a_config(prompt_encoder):
    torch.manual_seed(0)
    encoder = build_text_encoder(
        name="BertTextEncoder",
        name_or_path="not-on-disk",  # only read with pretrained=True or bert_config=None
        hidden_dim=16,
        pretrained=False,
        bert_config=TINY_BERT,
        bert_position_offset=0,
        freeze=False,
    )
    assert isinstance(encoder, BertTextEncoder)
    # bert_config builds the BERT: 32-wide hidden states (TINY_BERT), projected to 16.
    widths = []
    encoder.bert.register_forward_hook(lambda m, i, out: widths.append(out[0].shape[-1]))
    runs = prompt_encoder.runs_for_input(0, {"category_names": ["cat", "dog"]})
    out = encoder(prompt_encoder.batch(runs))
    assert widths == [TINY_BERT["hidden_size"]] == [32]
    assert out.features.shape == (1, 6, 16)  # [CLS] cat . dog . [SEP]
    with pytest.raises(TypeError):
        BertTextEncoder(name_or_path="x", hidden_dim=16)  # every argument is required
