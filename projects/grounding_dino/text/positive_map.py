"""Positive maps: which tokens each object's phrase covers (character spans -> token indices)."""

from typing import List, Optional, Sequence

import torch

from .captions import check_spans

__all__ = ["positive_map_from_spans", "positive_maps_from_spans"]


def _char_to_token(
    tokenized, batch_index: int, char_index: int, token_limit: Optional[int]
) -> Optional[int]:
    if char_index < 0:
        return None
    token = tokenized.char_to_token(batch_index, char_index)
    if token is not None and token_limit is not None and token >= token_limit:
        return None
    return token


def _token_range(tokenized, batch_index: int, beg: int, end: int, token_limit: Optional[int]):
    """First and last token of ``[beg, end)`` with the official fallbacks, or None."""

    def find(*chars: int) -> Optional[int]:
        for char_index in chars:
            token = _char_to_token(tokenized, batch_index, char_index, token_limit)
            if token is not None:
                return token
        return None

    beg_pos = find(beg, beg + 1, beg + 2)
    end_pos = find(end - 1, end - 2, end - 3)
    if beg_pos is None or end_pos is None:
        return None
    return beg_pos, end_pos


def _positive_map(
    tokenized,
    batch_index: int,
    spans,
    max_text_len: int,
    caption: Optional[str],
    token_limit: Optional[int] = None,
) -> torch.Tensor:
    if caption is not None:
        check_spans(caption, spans, what=f"caption {batch_index}")
    else:
        for i, obj in enumerate(spans):
            for beg, end in obj:
                if not 0 <= beg < end:
                    raise ValueError(f"span [{beg}, {end}) of object {i} is empty or negative")
    positive_map = torch.zeros((len(spans), max_text_len), dtype=torch.float)
    for j, obj in enumerate(spans):
        for beg, end in obj:
            found = _token_range(tokenized, batch_index, beg, end, token_limit)
            if found is not None:
                positive_map[j, found[0] : found[1] + 1] = 1
    return positive_map / (positive_map.sum(-1)[:, None] + 1e-6)


def positive_map_from_spans(
    tokenized,
    spans: Sequence[Sequence[Sequence[int]]],
    max_text_len: int = 256,
    caption: Optional[str] = None,
    token_limit: Optional[int] = None,
) -> torch.Tensor:
    """
    The official ``create_positive_map_from_span``: each object's spans mark tokens
    ``char_to_token(beg) .. char_to_token(end - 1)``; when a boundary character has no token
    (a space, a dropped character) it tries ``beg + 1``, ``beg + 2`` and ``end - 2``,
    ``end - 3``; spans whose tokens cannot be found are skipped. Rows are divided by
    ``sum + 1e-6`` as in the official code (rows of skipped objects stay zero).

    Args:
        tokenized: ``BatchEncoding`` of one caption (batch of one), from a fast tokenizer.
        spans: N objects, each a list of ``[beg, end)`` character spans.
        max_text_len: width of the map (256).
        caption: the tokenized caption; when given, spans outside it raise ValueError.
        token_limit: tokens at this index or beyond count as absent (as if the caption had
            been truncated there); None: no limit.

    Returns:
        FloatTensor [N, max_text_len].
    """
    return _positive_map(tokenized, 0, spans, max_text_len, caption, token_limit)


def positive_maps_from_spans(
    tokenized,
    spans_per_caption: Sequence[Sequence[Sequence[Sequence[int]]]],
    max_text_len: int = 256,
    captions: Optional[Sequence[str]] = None,
) -> List[torch.Tensor]:
    """
    Batched :func:`positive_map_from_spans`.

    Args:
        tokenized: ``BatchEncoding`` of B captions (see ``tokenize``).
        spans_per_caption: B lists of objects' spans.
        max_text_len: width of the maps (256).
        captions: the B captions, to check spans against.

    Returns:
        B FloatTensors [N_b, max_text_len].
    """
    batch_size = len(tokenized["input_ids"])
    if len(spans_per_caption) != batch_size:
        raise ValueError(f"Got spans for {len(spans_per_caption)} captions, tokenized {batch_size}")
    return [
        _positive_map(tokenized, b, spans, max_text_len, None if captions is None else captions[b])
        for b, spans in enumerate(spans_per_caption)
    ]
