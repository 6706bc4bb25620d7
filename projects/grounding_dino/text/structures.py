"""The prompt encoder's outputs: :class:`PromptRun` (one tokenised prompt of one input) and
:class:`TokenizedText` (the text encoder's input for a batch of runs)."""

from dataclasses import dataclass, fields, replace
from typing import List, Optional

import torch

__all__ = ["PromptRun", "TokenizedText"]


@dataclass
class PromptRun:
    """
    One pass of the transformer: an image with one caption (a whole prompt or one chunk).

    Attributes:
        image_index: index of the input the run belongs to.
        caption: the normalised caption.
        input_ids: its token ids with [CLS] and [SEP], unpadded (tokenised once). Longer than
            ``max_text_len`` only for a training caption (see
            :meth:`PromptEncoder.runs_for_input`); :meth:`PromptEncoder.batch` cuts it.
        category_indices: for category prompts, the global indices of the categories in this
            caption; for a caption with token spans, the phrase indices (None for free
            captions).
        positive_map: for category and token-span prompts, [C_run, max_text_len] normalised
            token map.
        phrase_offset: index of the run's first phrase in the whole caption.
    """

    image_index: int
    caption: str
    input_ids: List[int]
    category_indices: Optional[List[int]] = None
    positive_map: Optional[torch.Tensor] = None
    phrase_offset: int = 0


@dataclass
class TokenizedText:
    """
    The text encoder's input for a batch of B prompt runs, L <= max_text_len tokens.

    Attributes:
        input_ids: [B, L] long, padded with the tokenizer's pad id.
        token_mask: [B, L] bool, True on real (non-padding) tokens.
        self_attention_mask: [B, L, L] bool, True where token i may attend to token j (the
            sub-sentence mask).
        position_ids: [B, L] long, restarting at 0 in each phrase.
        token_type_ids: [B, L] long (zeros: one sentence per run).
    """

    input_ids: torch.Tensor
    token_mask: torch.Tensor
    self_attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor

    def to(self, device) -> "TokenizedText":
        """A copy with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})
