"""Input projections of the body's maps to the transformer's width (Grounding DINO's
``input_proj``), and body + projections on a list of images.

Every body level gets a 1x1 conv + GroupNorm(32) to ``hidden_dim`` channels; the levels
beyond the body's are 3x3 stride-2 convs + GroupNorm(32), the first on the body's last map,
the following ones on the previous extra level.

:meth:`InputProjectionNeck.forward_images` runs a list of images of any sizes, computing the
body and the projections per group of equal-size images and zero-padding the results
afterwards. Its output for an image does not depend on the other images of the batch (the
padded batch of the official and transformers' code does: Swin sees the padding and GroupNorm
takes statistics over it).

Parameters: ``projections.<l>.{weight,bias}`` and ``projections.<l>.norm.{weight,bias}``
(detectron2 ``Conv2d`` with a norm); ``grounding_dino.convert.keys`` maps the references'
``<l>.0.*`` (conv) / ``<l>.1.*`` (GroupNorm) layout onto them.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.layers import Conv2d
from detectron2.modeling import Backbone
from torch import nn

__all__ = ["InputProjectionNeck"]

MapsAndMasks = Tuple[List[torch.Tensor], List[torch.Tensor]]


def _projection(in_channels: int, out_channels: int, **conv_kwargs) -> Conv2d:
    conv = Conv2d(in_channels, out_channels, norm=nn.GroupNorm(32, out_channels), **conv_kwargs)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return conv


class InputProjectionNeck(nn.Module):
    """
    Projects a body's maps to ``num_feature_levels`` maps of ``hidden_dim`` channels.

    Args:
        in_channels: channels of the body's maps, finest first (its ``output_shape()``).
        hidden_dim: channels of every output level (divisible by 32, for the GroupNorm).
        num_feature_levels: output levels (>= ``len(in_channels)``); those beyond the body's
            are extra stride-2 convs.
    """

    def __init__(self, *, in_channels: Sequence[int], hidden_dim: int, num_feature_levels: int):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("InputProjectionNeck: in_channels is empty")
        if hidden_dim % 32 != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by 32 (GroupNorm)")
        if num_feature_levels < len(in_channels):
            raise ValueError(
                f"num_feature_levels ({num_feature_levels}) is smaller than the "
                f"{len(in_channels)} body levels of in_channels={in_channels}"
            )
        self.in_channels = tuple(in_channels)
        self.hidden_dim = hidden_dim
        self.num_feature_levels = num_feature_levels
        projections = [_projection(c, hidden_dim, kernel_size=1) for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projections.append(
                _projection(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1)
            )
            extra_in = hidden_dim
        self.projections = nn.ModuleList(projections)

    def check_backbone(self, backbone: Backbone) -> None:
        """Raises ValueError if ``backbone``'s output channels are not ``in_channels``."""
        channels = tuple(shape.channels for shape in backbone.output_shape().values())
        if channels != self.in_channels:
            raise ValueError(
                f"The neck's in_channels {self.in_channels} do not match the channels "
                f"{channels} of {type(backbone).__name__}.output_shape() "
                f"({list(backbone.output_shape())}); set model.neck.in_channels"
            )

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: the body's maps, finest first, [B, in_channels[i], H_i, W_i].

        Returns:
            ``num_feature_levels`` maps [B, hidden_dim, H_l, W_l] (extra levels halve the
            size, rounding up).
        """
        channels = tuple(f.shape[1] for f in features)
        if channels != self.in_channels:
            raise ValueError(
                f"InputProjectionNeck expects maps of {self.in_channels} channels, got "
                f"{channels}; set model.neck.in_channels to the body's output channels"
            )
        outs = [proj(f) for proj, f in zip(self.projections, features)]
        for level in range(len(features), self.num_feature_levels):
            source = features[-1] if level == len(features) else outs[-1]
            outs.append(self.projections[level](source))
        return outs

    def _project(self, backbone: Backbone, images: torch.Tensor) -> List[torch.Tensor]:
        """Body + projections of a [B, 3, H, W] batch."""
        return self(list(backbone(images).values()))

    def forward_images(self, backbone: Backbone, images: Sequence[torch.Tensor]) -> MapsAndMasks:
        """Runs images of any sizes so that each result equals the image run alone.

        Images of equal size run together; the maps of each level are then zero-padded at the
        bottom/right to the largest size of that level, and the masks mark each image's own
        extent.

        Args:
            backbone: the body.
            images: list of B normalised [3, H_i, W_i] images.

        Returns:
            maps: ``num_feature_levels`` maps [B, hidden_dim, H_l, W_l].
            masks: [B, H_l, W_l] bool, True on each image's own positions.
        """
        if len(images) == 0:
            raise ValueError("forward_images needs at least one image")
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {i} must be [3, H, W], got shape {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        per_group = [
            (index, self._project(backbone, torch.stack([images[i] for i in index])))
            for index in groups.values()
        ]
        if len(per_group) == 1:  # one size: the images are in order
            maps = per_group[0][1]
            masks = [m.new_ones((m.shape[0],) + m.shape[-2:], dtype=torch.bool) for m in maps]
            return maps, masks
        maps, masks = [], []
        for level in range(self.num_feature_levels):
            h = max(group_maps[level].shape[-2] for _, group_maps in per_group)
            w = max(group_maps[level].shape[-1] for _, group_maps in per_group)
            ref = per_group[0][1][level]
            level_map = ref.new_zeros((len(images), ref.shape[1], h, w))
            mask = torch.zeros((len(images), h, w), dtype=torch.bool, device=ref.device)
            for index, group_maps in per_group:
                hl, wl = group_maps[level].shape[-2:]
                index = torch.as_tensor(index, device=ref.device)
                level_map[index, :, :hl, :wl] = group_maps[level]
                mask[index, :hl, :wl] = True
            maps.append(level_map)
            masks.append(mask)
        return maps, masks
