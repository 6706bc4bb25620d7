"""Typed interfaces between the parts of the model (see docs/interfaces.md).

The image side hands the transformer a :class:`MultiScaleFeatures` (per-level maps), flattened
once into :class:`ImageTokens`; the text side hands it an :class:`EncodedText`. The feature
enhancer, the query selector and the decoder take and return these objects instead of long
positional argument lists, so a component registered by a user has one signature to follow.
"""

from dataclasses import dataclass, fields, replace
from typing import List

import torch

__all__ = ["MultiScaleFeatures", "ImageTokens", "EncodedText"]


def _index_select(obj, index: torch.Tensor, batched: List[str]):
    """A copy of dataclass ``obj`` with the batch rows ``index`` of its ``batched`` fields."""
    changes = {}
    for name in batched:
        value = getattr(obj, name)
        if isinstance(value, (list, tuple)):
            changes[name] = [t.index_select(0, index) for t in value]
        else:
            changes[name] = value.index_select(0, index)
    return replace(obj, **changes)


@dataclass
class MultiScaleFeatures:
    """
    Multi-scale image features, all projected to the transformer width C.

    Attributes:
        maps: per level, [B, C, H_l, W_l] features (zero outside each image's extent).
        masks: per level, [B, H_l, W_l] bool, True on valid positions.
        positions: per level, [B, C, H_l, W_l] position embeddings (sine, without the
            level embedding).
    """

    maps: List[torch.Tensor]
    masks: List[torch.Tensor]
    positions: List[torch.Tensor]

    def __post_init__(self):
        if not (len(self.maps) == len(self.masks) == len(self.positions)):
            raise ValueError(
                f"MultiScaleFeatures: {len(self.maps)} maps, {len(self.masks)} masks and "
                f"{len(self.positions)} position embeddings; expected one of each per level"
            )

    @property
    def num_levels(self) -> int:
        return len(self.maps)

    def index_select(self, index: torch.Tensor) -> "MultiScaleFeatures":
        """The features of batch rows ``index`` ([R] long), e.g. one row per prompt chunk."""
        return _index_select(self, index, ["maps", "masks", "positions"])

    def flatten(self) -> "ImageTokens":
        """Flattens the levels into one token sequence (level 0 first, row-major)."""
        shapes = [tuple(f.shape[-2:]) for f in self.maps]
        device = self.maps[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            [spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]]
        )
        valid_ratios = torch.stack(
            [
                torch.stack([m[:, 0, :].sum(1) / m.shape[2], m[:, :, 0].sum(1) / m.shape[1]], -1)
                for m in self.masks
            ],
            1,
        ).to(self.maps[0].dtype)
        return ImageTokens(
            tokens=torch.cat([f.flatten(2).transpose(1, 2) for f in self.maps], 1),
            positions=torch.cat([p.flatten(2).transpose(1, 2) for p in self.positions], 1),
            valid_mask=torch.cat([m.flatten(1) for m in self.masks], 1),
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
        )


@dataclass
class ImageTokens:
    """
    Multi-scale image features flattened into one sequence of S = sum_l H_l * W_l tokens.

    Attributes:
        tokens: [B, S, C] image tokens (after the feature enhancer: its memory).
        positions: [B, S, C] sine position embeddings (without the level embedding).
        valid_mask: [B, S] bool, True on tokens inside the image (False on padding).
        spatial_shapes: [num_levels, 2] long, (H_l, W_l) of each level.
        level_start_index: [num_levels] long, index of each level's first token.
        valid_ratios: [B, num_levels, 2], (w, h) fraction of each level that is valid.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    valid_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor

    def with_tokens(self, tokens: torch.Tensor) -> "ImageTokens":
        """The same layout with new tokens (e.g. the enhancer's memory)."""
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} != {tuple(self.tokens.shape)}")
        return replace(self, tokens=tokens)

    def index_select(self, index: torch.Tensor) -> "ImageTokens":
        return _index_select(self, index, ["tokens", "positions", "valid_mask", "valid_ratios"])


@dataclass
class EncodedText:
    """
    Text features of a batch of captions (one row per prompt run).

    Attributes:
        features: [B, L, C] token features, projected to the transformer width.
        token_mask: [B, L] bool, True on real (non-padding) tokens.
        self_attention_mask: [B, L, L] bool, True where token i may attend to token j (the
            sub-sentence mask).
        position_ids: [B, L] long, restarting at 0 in each phrase.
        input_ids: [B, L] long.
    """

    features: torch.Tensor
    token_mask: torch.Tensor
    self_attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_ids: torch.Tensor

    def with_features(self, features: torch.Tensor) -> "EncodedText":
        """The same text with new features (e.g. the enhancer's output)."""
        if features.shape[:2] != self.features.shape[:2]:
            raise ValueError(f"features {tuple(features.shape)} != {tuple(self.features.shape)}")
        return replace(self, features=features)

    def index_select(self, index: torch.Tensor) -> "EncodedText":
        return _index_select(self, index, [f.name for f in fields(self)])
