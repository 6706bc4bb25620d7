"""The contrastive head: official (parameter-free) and with the optional learned prior bias."""

import torch

from grounding_dino.modeling.head import ContrastiveHead


def test_official_head_masks_padding_and_pads_to_max_text_len():
    head = ContrastiveHead(max_text_len=8)
    assert list(head.parameters()) == []
    queries, text = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    logits = head(queries, text, mask)
    assert logits.shape == (2, 3, 8)
    assert torch.allclose(logits[0, :, :5], queries[0] @ text[0].T)
    assert torch.isinf(logits[1, :, 3:]).all() and torch.isinf(logits[:, :, 5:]).all()


def test_prior_bias_starts_scores_low_and_learns():
    head = ContrastiveHead(max_text_len=8, bias_init=-4.6)
    queries = torch.zeros(1, 2, 4)
    text = torch.randn(1, 3, 4)
    logits = head(queries, text, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(logits[..., :3].sigmoid(), torch.full((1, 2, 3), 0.01), atol=1e-3)
    logits[..., :3].sum().backward()
    assert head.bias.grad is not None and head.bias.grad.item() == 6.0


def test_log_scale_divides_by_sqrt_width():
    head = ContrastiveHead(max_text_len=4, log_scale_init=0.0)
    queries, text = torch.randn(1, 2, 16), torch.randn(1, 3, 16)
    logits = head(queries, text, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(logits[..., :3], queries @ text.transpose(1, 2) / 4.0, atol=1e-6)
