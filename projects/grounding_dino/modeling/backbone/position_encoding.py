"""Sine position embedding of image feature maps (DETR's, with separate H/W temperatures).

Equals the official ``PositionEmbeddingSineHW`` (Grounding DINO uses temperature 20 in both
directions, ``normalize=True``, scale 2*pi, 128 features per direction) and transformers'
``GroundingDinoSinePositionEmbedding``. Positions are counted over valid pixels only, so the
embedding of a valid position does not depend on how much padding follows it.
"""

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSineHW"]


class PositionEmbeddingSineHW(nn.Module):
    """Sine/cosine embedding of normalised (y, x) positions of valid pixels.

    Args:
        num_pos_feats: features per direction; the output has ``2 * num_pos_feats``.
        temperature_h: frequency base for y.
        temperature_w: frequency base for x.
        normalize: scale the cumulative positions to [0, scale].
        scale: range of normalised positions (default 2*pi).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        normalize: bool = True,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSineHW: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _frequencies(self, temperature: float, device) -> torch.Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: [B, H, W] bool, True on valid (non-padded) positions.

        Returns:
            [B, 2 * num_pos_feats, H, W] float32: y features then x features, each
            interleaving sin (even) and cos (odd).
        """
        if mask.dim() != 3:
            raise ValueError(f"mask must be [B, H, W], got shape {tuple(mask.shape)}")
        y_embed = mask.cumsum(1, dtype=torch.float32)
        x_embed = mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = x_embed[..., None] / self._frequencies(self.temperature_w, mask.device)
        pos_y = y_embed[..., None] / self._frequencies(self.temperature_h, mask.device)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
