"""The contrastive classification head: query features scored against text tokens."""

from typing import Optional

import torch
from torch import nn

__all__ = ["ContrastiveHead"]


class ContrastiveHead(nn.Module):
    """
    ``logits = queries @ text^T`` with no parameters; ``-inf`` on padding tokens and on the
    columns past the caption, padded to ``max_text_len`` columns.
    """

    def __init__(self, max_text_len: int = 256, bias_init: Optional[float] = None):
        """
        Args:
            max_text_len: number of logit columns.
            bias_init: None (the official head: no parameters), or the initial value of a
                learned scalar added to every logit. ``-log((1 - p) / p)`` with p = 0.01
                (-4.6) starts every token score at 1%, the focal-loss prior that makes
                training from scratch converge much faster (MM-Grounding-DINO has the same
                option). Official and HF checkpoints have no such parameter.
        """
        super().__init__()
        self.max_text_len = max_text_len
        self.bias = None if bias_init is None else nn.Parameter(torch.tensor(float(bias_init)))

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """
        Args:
            queries: [B, Q, C]; text: [B, L, C]; text_mask: [B, L] bool, True on valid tokens.

        Returns:
            [B, Q, max_text_len] logits.
        """
        logits = queries @ text.transpose(-1, -2)
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
        padding = self.max_text_len - logits.shape[-1]
        if padding < 0:
            raise ValueError(
                f"{logits.shape[-1]} text tokens exceed max_text_len " f"{self.max_text_len}"
            )
        return nn.functional.pad(logits, (0, padding), value=float("-inf"))
