"""Sine position embedding of image feature maps (DETR's, normalised).

Equals the official ``PositionEmbeddingSineHW`` as Grounding DINO uses it (the same temperature,
20, in both directions, ``normalize=True``, scale 2*pi, ``hidden_dim / 2`` features per
direction) and transformers' ``GroundingDinoSinePositionEmbedding``. Positions are counted over
valid pixels only, so the embedding of a valid position does not depend on how much padding
follows it.
"""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """
    Sine/cosine embedding of the normalised (y, x) positions of valid pixels.

    Args:
        hidden_dim: output channels (divisible by 4); half encode y, half x.
        temperature: frequency base of both directions.
    """

    def __init__(self, *, hidden_dim: int, temperature: float):
        super().__init__()
        if hidden_dim % 4 != 0:
            raise ValueError(
                f"PositionEmbeddingSine: hidden_dim ({hidden_dim}) must be divisible by 4"
            )
        self.num_pos_feats = hidden_dim // 2
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: [B, H, W] bool, True on valid (non-padded) positions.

        Returns:
            [B, hidden_dim, H, W] float32: y features then x features, each interleaving sin
            (even) and cos (odd).
        """
        if mask.dim() != 3:
            raise ValueError(f"mask must be [B, H, W], got shape {tuple(mask.shape)}")
        eps = 1e-6
        y_embed = mask.cumsum(1, dtype=torch.float32)
        x_embed = mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        exponent = 2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        dim_t = self.temperature**exponent
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
