"""Multi-head attention on ``scaled_dot_product_attention``, with nn.MultiheadAttention's
parameter layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), batch first."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention whose weights load from ``nn.MultiheadAttention``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
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
