"""The contrastive classification head: query features scored against text tokens."""

import copy
from typing import List, Optional

import torch
from torch import nn

__all__ = ["ContrastiveHead", "layer_heads", "layer_logits"]


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
        fixed_scale: bool = False,
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

            fixed_scale: divide the logits by sqrt(C) as a constant, not a parameter: the head
                of MM-Grounding-DINO and LLMDet (mmdet's ``log_scale="auto"``, transformers'
                ``MMGroundingDinoContrastiveEmbedding``), where fine-tuning moves only the bias.
                Excludes ``log_scale_init``.

        The two learned options (MM-Grounding-DINO has the bias) make training from scratch
        converge much faster. Official and HF Grounding DINO checkpoints have neither.
        """
        super().__init__()
        if fixed_scale and log_scale_init is not None:
            raise ValueError(
                "ContrastiveHead: fixed_scale=True (a constant 1/sqrt(C)) excludes a learned "
                f"log scale, got log_scale_init={log_scale_init}"
            )
        self.max_text_len = max_text_len
        self.fixed_scale = fixed_scale
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
        elif self.fixed_scale:
            logits = logits / queries.shape[-1] ** 0.5
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


def layer_heads(head: nn.Module, num_layers: int) -> nn.ModuleList:
    """
    ``num_layers`` independent copies of ``head``: one head per decoder layer, as
    MM-Grounding-DINO and LLMDet have (the official model shares one head over its layers).
    :class:`~grounding_dino.modeling.GroundingDINO` applies copy ``i`` to decoder layer ``i``;
    the copies start equal and are trained (and loaded, ``head.<i>.*``) separately.
    """
    if num_layers < 1:
        raise ValueError(f"layer_heads: num_layers must be at least 1, got {num_layers}")
    return nn.ModuleList(copy.deepcopy(head) for _ in range(num_layers))


def layer_logits(
    head: nn.Module, hidden: List[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """
    Token logits of every decoder layer.

    Args:
        head: one head shared by the layers, or an ``nn.ModuleList`` of one head per layer
            (:func:`layer_heads`).
        hidden: list over layers of [B, Q, C] decoder outputs.
        text: [B, L, C] text features; text_mask: [B, L] bool, True on valid tokens.

    Returns:
        [num_layers, B, Q, max_text_len] logits.
    """
    heads = head if isinstance(head, nn.ModuleList) else [head] * len(hidden)
    if len(heads) != len(hidden):
        raise ValueError(
            f"{len(heads)} per-layer contrastive heads for {len(hidden)} decoder layers; "
            "layer_heads(num_layers=...) must equal the decoder's num_layers"
        )
    return torch.stack([layer_head(h, text, text_mask) for layer_head, h in zip(heads, hidden)])
