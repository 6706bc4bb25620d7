"""The contrastive head against transformers' and the official code's, and its two options.

The parameter-free head (``bias_init=None, log_scale_init=None``) must equal transformers'
``GroundingDinoContrastiveEmbedding`` and the official ``ContrastiveEmbed`` exactly, ``-inf``
entries included. The learned prior bias and log scale have no reference implementation here,
so their tests check the behaviours they exist for (initial scores near the prior, logits of
order 1 for random features, learnable scalars) relative to transformers' head.
"""

import math

import pytest
import torch
from groundingdino.models.GroundingDINO.utils import ContrastiveEmbed
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoContrastiveEmbedding,
)

from grounding_dino.modeling.head import ContrastiveHead

MAX_TEXT_LEN = 12


def _head(bias_init=None, log_scale_init=None, max_text_len=MAX_TEXT_LEN):
    return ContrastiveHead(
        max_text_len=max_text_len, bias_init=bias_init, log_scale_init=log_scale_init
    )


def _hf_head(max_text_len=MAX_TEXT_LEN):
    config = type("Config", (), {"max_text_len": max_text_len})
    return GroundingDinoContrastiveEmbedding(config)


def _inputs(dim=32, num_queries=5, num_tokens=7, seed=0):
    """Queries [2, Q, C], text [2, L, C] and a mask [2, L] with a padded second caption."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, num_queries, dim, generator=gen)
    text = torch.randn(2, num_tokens, dim, generator=gen)
    mask = torch.ones(2, num_tokens, dtype=torch.bool)
    mask[1, num_tokens - 3 :] = False
    return queries, text, mask


@pytest.mark.parametrize("num_tokens", [7, MAX_TEXT_LEN])
def test_official_head_equals_transformers_and_official_code(num_tokens):
    queries, text, mask = _inputs(num_tokens=num_tokens)
    ours = _head()(queries, text, mask)
    theirs = _hf_head()(queries, text, mask)
    official = ContrastiveEmbed(max_text_len=MAX_TEXT_LEN)(
        queries, {"encoded_text": text, "text_token_mask": mask}
    )
    assert ours.shape == (2, 5, MAX_TEXT_LEN)
    assert torch.equal(ours, theirs) and torch.equal(ours, official)
    assert torch.isneginf(ours[1, :, num_tokens - 3 :]).all()  # padding and unused columns
    assert torch.isfinite(ours[0, :, :num_tokens]).all()


def test_official_head_has_no_state():
    # Official and transformers checkpoints hold no key for the head.
    head = _head()
    assert list(head.parameters()) == [] and head.state_dict() == {}


def test_too_many_tokens_is_an_error():
    queries, text, mask = _inputs(num_tokens=MAX_TEXT_LEN + 1)
    with pytest.raises(ValueError, match="max_text_len"):
        _head()(queries, text, mask)


def test_constructor_is_keyword_only_without_defaults():
    with pytest.raises(TypeError):
        ContrastiveHead(MAX_TEXT_LEN, None, None)
    with pytest.raises(TypeError, match="log_scale_init"):
        ContrastiveHead(max_text_len=MAX_TEXT_LEN, bias_init=None)


def test_prior_bias_shifts_valid_logits_and_is_learned():
    prior = 0.01
    bias = -math.log((1 - prior) / prior)
    head = _head(bias_init=bias)
    assert [name for name, _ in head.named_parameters()] == ["bias"]
    queries, text, mask = _inputs()
    reference = _hf_head()(queries, text, mask)
    logits = head(queries, text, mask)
    valid = torch.isfinite(reference)
    assert torch.equal(torch.isfinite(logits), valid)  # masked columns stay -inf
    torch.testing.assert_close(logits[valid], reference[valid] + bias)
    # Zero queries: every valid token starts at the prior score.
    zero = head(torch.zeros_like(queries), text, mask)
    torch.testing.assert_close(zero[valid].sigmoid(), torch.full_like(zero[valid], prior))
    # The bias receives the gradient of every valid logit (and none of the masked ones).
    logits[valid].sum().backward()
    assert head.bias.grad.item() == pytest.approx(valid.sum().item())


def test_log_scale_keeps_random_logits_of_order_one():
    dim = 256
    queries, text, mask = _inputs(dim=dim, num_queries=64, num_tokens=MAX_TEXT_LEN)
    reference = _hf_head()(queries, text, mask)
    valid = torch.isfinite(reference)
    assert reference[valid].std().item() > 10  # about sqrt(256) = 16 without the scale
    head = _head(log_scale_init=0.0)
    assert [name for name, _ in head.named_parameters()] == ["log_scale"]
    logits = head(queries, text, mask)
    assert torch.equal(torch.isfinite(logits), valid)
    assert 0.8 < logits[valid].std().item() < 1.2
    # The scale is exp(log_scale) relative to 1 / sqrt(C); ratios to transformers' logits.
    doubled = _head(log_scale_init=math.log(2.0))(queries, text, mask)
    torch.testing.assert_close(doubled[valid], 2 * logits[valid])
    torch.testing.assert_close(logits[valid] * math.sqrt(dim), reference[valid])
    logits[valid].pow(2).sum().backward()
    assert head.log_scale.grad.item() > 0  # growing the scale grows the squared logits
