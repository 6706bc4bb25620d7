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

    def __init__(
        self,
        *,
        max_text_len: int,
        bias_init: Optional[float],
        log_scale_init: Optional[float],
    ):
        """
        Args:
            max_text_len: number of logit columns.
            bias_init: None (the official head), or the initial value of a learned scalar
                added to every logit. ``-log((1 - p) / p)`` with p = 0.01 (-4.6) starts every
                token score near 1%, the focal-loss prior.
            log_scale_init: None (the official head), or the initial value of a learned log
                scale of the logits, which are then divided by sqrt(C) first: random features
                of width C give logits of about +-1 instead of +-sqrt(C).

        The two options (MM-Grounding-DINO has the same) make training from scratch converge
        much faster. Official and HF checkpoints have neither parameter.
        """
        super().__init__()
        self.max_text_len = max_text_len
        self.bias = None if bias_init is None else nn.Parameter(torch.tensor(float(bias_init)))
        self.log_scale = (
            None if log_scale_init is None else nn.Parameter(torch.tensor(float(log_scale_init)))
        )

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """
        Args:
            queries: [B, Q, C]; text: [B, L, C]; text_mask: [B, L] bool, True on valid tokens.

        Returns:
            [B, Q, max_text_len] logits.
        """
        logits = queries @ text.transpose(-1, -2)
        if self.log_scale is not None:
            logits = logits * (self.log_scale.exp() / queries.shape[-1] ** 0.5)
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
        padding = self.max_text_len - logits.shape[-1]
        if padding < 0:
            raise ValueError(
                f"ContrastiveHead: {logits.shape[-1]} text tokens exceed max_text_len "
                f"{self.max_text_len}"
            )
        return nn.functional.pad(logits, (0, padding), value=float("-inf"))
