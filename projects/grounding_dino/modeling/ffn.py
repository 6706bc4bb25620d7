"""The feed-forward sublayer of the enhancer's and the decoder's post-norm transformer layers."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PostNormFFNLayer"]


class PostNormFFNLayer(nn.Module):
    """
    Base class of a transformer layer that ends in the post-norm FFN sublayer
    ``norm(x + dropout(linear2(dropout(relu(linear1(x))))))``.

    The sublayer's weights are attributes of the layer itself (``linear1``, ``linear2``), not of
    a child module, so that the layers keep the official checkpoint keys
    (``<layer>.linear1.weight``, ...) which the converters map one to one. The norm is the
    subclass's own (its name differs between layers), and ``dropout`` also serves the
    subclass's attention residuals.
    """

    def _build_ffn(self, d_model: int, ffn_dim: int, dropout: float) -> None:
        """Creates ``linear1`` [d_model -> ffn_dim], ``linear2`` [ffn_dim -> d_model] and
        ``dropout``."""
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def ffn(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """[..., d_model] -> ``norm(x + FFN(x))``, row by row (rows may run in chunks)."""
        return self.ffn_after_linear1(x, self.linear1(x), norm)

    def ffn_after_linear1(
        self, x: torch.Tensor, hidden: torch.Tensor, norm: nn.Module
    ) -> torch.Tensor:
        """:meth:`ffn` given ``hidden`` = ``linear1(x)`` [..., ffn_dim] (computed by the caller,
        e.g. with the norm before it: :func:`.recomputed_linear.layer_norm_linear`)."""
        # In place only without autograd (inference: no second [..., ffn_dim] tensor). With
        # autograd, linear1's output is a view of its matrix product, and an in-place ReLU on
        # it makes the backward clone and zero the whole [rows, ffn_dim] gradient (CopySlices).
        hidden = F.relu(hidden, inplace=not (torch.is_grad_enabled() and hidden.requires_grad))
        hidden = self.dropout(hidden)
        return norm(x + self.dropout(self.linear2(hidden)))
