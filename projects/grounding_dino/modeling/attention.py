"""The attentions of the transformer.

:class:`MultiheadAttention` (on ``scaled_dot_product_attention``) has nn.MultiheadAttention's
parameter layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), batch first;
:class:`BiMultiHeadAttention` is the feature enhancer's image<->text attention (the official
``BiMultiHeadAttention``'s parameters) with the reference's guards against float16 overflow
(:func:`stable_bi_logits`).
"""

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .utils import linear_weight

__all__ = ["MultiheadAttention", "BiMultiHeadAttention", "LOGIT_BOUND", "stable_bi_logits"]

LOGIT_BOUND = 50000.0
"""The reference's bound on the image-text logits after subtracting their maximum (official
``BiMultiHeadAttention``, transformers' ``GroundingDinoBiMultiHeadAttention``): below
float16's largest finite value (65504), so no logit is -inf before the masks."""


def stable_bi_logits(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The reference's overflow guards on the image-text logits, in float32.

    The reference subtracts the maximum of all logits and clamps them to +-:data:`LOGIT_BOUND`
    (for the softmax over text tokens), then subtracts each text token's maximum over the image
    tokens and clamps again (for the softmax over image tokens). Softmax is shift-invariant, so
    the same softmaxes come from raising every logit below ``maximum - LOGIT_BOUND`` to it,
    without the subtractions (which would round every logit): that is what this returns. For
    logits that span less than the bound nothing changes; beyond it the far ones are held
    instead of becoming -inf in float16 (a row of -inf is a NaN softmax).

    Args:
        logits: [B, S, H, L] attention logits of S image tokens and L text tokens per head.

    Returns:
        (image_to_text, text_to_image), both [B, S, H, L] float32, for the softmax over the
        text tokens (dim -1) and over the image tokens (dim 1).
    """
    logits = logits.float()  # bf16 would round small logits on the maximum's coarse grid
    image_to_text = torch.maximum(logits, logits.max() - LOGIT_BOUND)
    floor = image_to_text.amax(1, keepdim=True) - LOGIT_BOUND
    return image_to_text, torch.maximum(image_to_text, floor)


def _float32_if_half(tensor: torch.Tensor):
    """Autocast off for the logits' products when ``tensor`` is float16 (fp16 autocast or a
    ``.half()`` model): their sums over the channels can pass float16's 65504 and become inf,
    which no clamp undoes; bf16 and fp32 have float32's range and keep their dtype."""
    if tensor.dtype != torch.float16:
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention whose weights load from ``nn.MultiheadAttention``."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float):
        """
        Args:
            embed_dim: channels C of queries, keys and values.
            num_heads: attention heads; C must be divisible by it.
            dropout: dropout on the attention probabilities (training only).
        """
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Lq, C]; key, value: [B, Lk, C].
            allowed: bool, broadcastable to [B, heads, Lq, Lk]; True where attention is
                allowed. Every query row must allow at least one key.

        Returns:
            [B, Lq, C]
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        elif query is key:
            q, k = F.linear(
                query,
                self.in_proj_weight[: 2 * self.embed_dim],
                self.in_proj_bias[: 2 * self.embed_dim],
            ).chunk(2, dim=-1)
            v = F.linear(value, w_v, b_v)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        out = F.scaled_dot_product_attention(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one matrix of logits."""

    def __init__(self, *, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float):
        """
        Args:
            v_dim: channels of the image tokens.
            l_dim: channels of the text tokens.
            embed_dim: channels of the shared attention space; divisible by ``num_heads``.
            num_heads: attention heads.
            dropout: dropout on the attention probabilities (training only).
        """
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for layer in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.embed_dim)

    def forward(self, image, text, image_mask, text_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image: [B, S, Cv]; text: [B, L, Cl].
            image_mask: [B, S] bool, True on valid image tokens.
            text_mask: [B, L] bool, True on valid text tokens.

        Returns:
            delta_image [B, S, Cv], delta_text [B, L, Cl].
        """
        if self.training and self.dropout > 0:
            return self._forward_projected(image, text, image_mask, text_mask)
        return self._forward_folded(image, text, image_mask, text_mask)

    def _forward_folded(self, image, text, image_mask, text_mask):
        """
        The same attention with every image-side projection folded into the text side.

        There are S ~ 22k image tokens and L ~ 10-30 text tokens, and the projections to
        ``embed_dim`` (1024) on the image side cost 3 * S * Cv * 1024 multiply-adds per layer.
        Per head h (projection rows ``W_h``, biases ``b_h``, scale s):

        - logits ``(x Wv_h^T + bv_h) k_h^T s = x (Wv_h^T k_h^T s) + (k_h bv_h s)``: the image
          tokens x [S, Cv] meet a [Cv, L] matrix instead of being projected;
        - image output ``out_v(sum_h P_h v_h)``: ``sum_h P_h (v_h Wout_h^T) + b_out`` with
          P_h [S, L] the softmax over text tokens, so the [L, Cv] products are all that is
          projected;
        - text output ``Q_h (x Wvv_h^T + bvv_h) = (Q_h x) Wvv_h^T + bvv_h`` with Q_h [L, S]
          the softmax over image tokens (its rows sum to 1).

        The image side then costs O(S * H * L * Cv) instead of O(S * Cv * embed_dim). The
        results equal :meth:`_forward_projected` up to fp32 rounding.
        """
        batch, length, _ = text.shape
        heads, dim = self.num_heads, self.head_dim
        scale = dim**-0.5
        key = self.l_proj(text).view(batch, length, heads, dim)  # [B, L, H, d]
        weight_v = linear_weight(self.v_proj).view(heads, dim, -1)  # [H, d, Cv]
        bias_v = self.v_proj.bias.view(heads, dim)
        with _float32_if_half(key):
            if key.dtype == torch.float16:
                key, weight_v, bias_v = key.float(), weight_v.float(), bias_v.float()
            # [B, Cv, H*L] and [B, 1, H*L]: logits = image @ key_in_image + key_bias
            key_in_image = torch.einsum("hdc,blhd->bchl", weight_v, key).flatten(2) * scale
            key_bias = torch.einsum("hd,blhd->bhl", bias_v, key)
            key_bias = key_bias.reshape(batch, 1, heads * length) * scale
            image_for_logits = image.to(key_in_image.dtype)
            logits = torch.baddbmm(key_bias, image_for_logits, key_in_image)  # [B, S, H*L]
        probs, image_probs = self._softmaxes(
            logits.view(batch, -1, heads, length), image_mask, text_mask
        )

        # Image -> text: softmax over the text tokens of each head.
        text_values = self.values_l_proj(text).view(batch, length, heads, dim)
        weight_out = linear_weight(self.out_v_proj).view(-1, heads, dim)  # [Cv, H, d]
        projected_values = torch.einsum("blhd,chd->bhlc", text_values, weight_out)
        delta_image = torch.baddbmm(
            self.out_v_proj.bias,
            probs.flatten(2).to(projected_values.dtype),
            projected_values.flatten(1, 2),
        )

        # Text -> image: softmax over the valid image tokens.
        pooled = torch.einsum("bshl,bsc->bhlc", image_probs.to(image.dtype), image)
        weight_vv = linear_weight(self.values_v_proj).view(heads, dim, -1)  # [H, d, Cv]
        text_out = torch.einsum("bhlc,hdc->blhd", pooled, weight_vv)
        text_out = text_out + self.values_v_proj.bias.view(heads, dim)
        delta_text = self.out_l_proj(text_out.reshape(batch, length, self.embed_dim))
        return delta_image, delta_text

    def _softmaxes(self, logits, image_mask, text_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            logits: [B, S, H, L]; image_mask [B, S], text_mask [B, L] (True on valid tokens).

        Returns:
            float32 [B, S, H, L] softmaxes over the valid text tokens and over the valid image
            tokens, from the logits guarded as the reference does (:func:`stable_bi_logits`).
        """
        image_to_text, text_to_image = stable_bi_logits(logits)
        probs = image_to_text.masked_fill(~text_mask[:, None, None, :], float("-inf")).softmax(-1)
        text_to_image = text_to_image.masked_fill(~image_mask[:, :, None, None], float("-inf"))
        return probs, text_to_image.softmax(1)

    def _forward_projected(self, image, text, image_mask, text_mask):
        """The attention as written in the paper, with dropout on both softmaxes (training)."""
        query = self._heads(self.v_proj(image))  # [B, H, S, d]
        key = self._heads(self.l_proj(text))  # [B, H, L, d]
        with _float32_if_half(key):
            if key.dtype == torch.float16:
                query, key = query.float(), key.float()
            logits = torch.einsum("bhsd,bhld->bshl", query, key) * self.head_dim**-0.5
        probs, image_probs = self._softmaxes(logits, image_mask, text_mask)
        dropout = self.dropout if self.training else 0.0
        probs = F.dropout(probs, dropout, self.training)
        image_probs = F.dropout(image_probs, dropout, self.training)
        image_values = self._heads(self.values_v_proj(image))
        text_values = self._heads(self.values_l_proj(text))
        image_out = torch.einsum("bshl,bhld->bhsd", probs.to(text_values.dtype), text_values)
        text_out = torch.einsum("bshl,bhsd->bhld", image_probs.to(image_values.dtype), image_values)
        return self.out_v_proj(self._merge(image_out)), self.out_l_proj(self._merge(text_out))
