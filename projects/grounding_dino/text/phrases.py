"""Phrases of detections: the tokens each box scores above the text threshold, decoded."""

from typing import List

import torch

__all__ = ["phrases_from_token_scores"]


def phrases_from_token_scores(
    token_scores: torch.Tensor, input_ids, tokenizer, text_threshold: float
) -> List[str]:
    """
    The official ``predict()`` phrases: for each box, the tokens whose score exceeds
    ``text_threshold`` are decoded with the tokenizer and periods are removed
    (``get_phrases_from_posmap(score > text_threshold, ...).replace(".", "")``). As in the
    official and transformers' post-processing, [CLS], [SEP] and padding are never part of a
    phrase.

    Args:
        token_scores: [N, L'] token probabilities (sigmoid of the logits); columns beyond the
            caption's tokens (L' = 256 padding) are ignored.
        input_ids: [L] token ids of the caption (tensor or list), without padding or with it.
        tokenizer: the Hugging Face tokenizer that produced ``input_ids``.
        text_threshold: score threshold (0.25 in the official demo).

    Returns:
        N strings (empty where no token passes).
    """
    if token_scores.dim() != 2:
        raise ValueError(f"token_scores must be [N, L], got shape {tuple(token_scores.shape)}")
    ids = torch.as_tensor(input_ids).reshape(-1)
    length = min(ids.numel(), token_scores.shape[1])
    ids = ids[:length]
    excluded = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    valid = torch.tensor([int(i) not in excluded for i in ids.tolist()], dtype=torch.bool)
    keep = (token_scores[:, :length] > text_threshold) & valid[None]
    id_list = ids.tolist()
    phrases = []
    for row in keep:
        token_ids = [id_list[i] for i in row.nonzero(as_tuple=True)[0].tolist()]
        phrases.append(tokenizer.decode(token_ids).replace(".", ""))
    return phrases
