"""Sub-sentence attention masks and position ids (the official "text sub-sentence" scheme)."""

from typing import Sequence, Tuple

import torch

__all__ = ["sub_sentence_masks"]


def sub_sentence_masks(
    input_ids: torch.Tensor, special_token_ids: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Split each caption into phrases at special tokens ([CLS], [SEP], ".", "?").

    Tokens attend only to tokens of their own phrase (the phrase includes its closing special
    token); position ids restart at 0 in each phrase. A special token at index 0 or at the last
    index L-1 forms a phrase of its own. Tokens after the last special token (padding) attend
    only to themselves with position id 0. This equals the official
    ``generate_masks_with_special_tokens_and_transfer_map``, without its Python loop.

    Args:
        input_ids: [B, L] token ids.
        special_token_ids: ids that close a phrase.

    Returns:
        attention_mask: [B, L, L] bool, True where query token i may attend to key token j.
        position_ids: [B, L] long.
    """
    batch_size, length = input_ids.shape
    device = input_ids.device
    is_special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in special_token_ids:
        is_special |= input_ids == token_id
    columns = torch.arange(length, device=device).expand(batch_size, -1)
    # A special token at index 0 or L-1 is a phrase of its own; it closes no phrase.
    alone = is_special & ((columns == 0) | (columns == length - 1))

    # Index of the first special token at or after each token (L where there is none).
    special_index = torch.where(is_special, columns, torch.full_like(columns, length))
    next_special = special_index.flip(1).cummin(dim=1).values.flip(1)
    closes = torch.cat([is_special & ~alone, is_special.new_zeros(batch_size, 1)], dim=1)
    in_phrase = closes.gather(1, next_special)
    in_phrase[:, 0] = False  # the official scheme starts the first phrase at index 1

    same_phrase = next_special[:, :, None] == next_special[:, None, :]
    same_phrase &= in_phrase[:, :, None] & in_phrase[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=device)[None]
    attention_mask = same_phrase | eye

    # Position within the phrase: distance to the last special token before it (or to 0).
    previous_special = torch.where(is_special, columns, torch.zeros_like(columns))
    previous_special = (
        torch.cat([previous_special.new_zeros(batch_size, 1), previous_special[:, :-1]], dim=1)
        .cummax(dim=1)
        .values
    )
    position_ids = torch.where(in_phrase, columns - previous_special - 1, torch.zeros_like(columns))
    return attention_mask, position_ids
