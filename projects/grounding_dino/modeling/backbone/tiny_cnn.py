"""A small convolutional image body for CPU training (the synthetic shapes demo).

:class:`TinyCNNBackbone` is a plain stack of 3x3 convolutions with GroupNorm and ReLU that
returns the maps of its last stages (e.g. strides 16, 32 and 64: coarse maps keep the
encoder's token count, and so the CPU time, small). GroupNorm, not BatchNorm: the features of
one image do not depend on the rest of its batch, in training as in inference.
"""

from typing import Dict, Sequence

import torch
from detectron2.modeling import Backbone
from torch import nn

from ..registry import IMAGE_BACKBONE_REGISTRY

__all__ = ["TinyCNNBackbone"]


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    groups = 8 if out_channels % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


@IMAGE_BACKBONE_REGISTRY.register()
class TinyCNNBackbone(Backbone):
    """
    A stem (two stride-2 convs, stride 4) followed by one stage per entry of ``channels``
    after the first: a stride-2 conv and ``convs_per_stage - 1`` stride-1 convs. Stage ``i``
    (0-based) has stride ``2 ** (i + 3)`` and is returned as ``"stage<i>"``.

    Args:
        channels: widths (stem at stride 4, then strides 8, 16, 32, ...).
        convs_per_stage: convolutions per stage (>= 1).
        num_outputs: the last ``num_outputs`` stages are returned.
        frozen_stages: -1 nothing; 0 the stem; k >= 1 also stages 0..k-1 (mmdet's ResNet
            convention); frozen parameters get ``requires_grad=False``.
    """

    def __init__(
        self,
        *,
        channels: Sequence[int],
        convs_per_stage: int,
        num_outputs: int,
        frozen_stages: int,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"TinyCNNBackbone needs >= 2 widths (stem + 1 stage), got {channels}")
        if convs_per_stage < 1:
            raise ValueError(f"TinyCNNBackbone convs_per_stage must be >= 1, got {convs_per_stage}")
        num_stages = len(channels) - 1
        if not 1 <= num_outputs <= num_stages:
            raise ValueError(
                f"TinyCNNBackbone num_outputs must be in [1, {num_stages}] for channels "
                f"{channels}, got {num_outputs}"
            )
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"TinyCNNBackbone frozen_stages={frozen_stages} not in [-1, {num_stages}]"
            )
        stem = channels[0]
        self.stem = nn.Sequential(_conv_gn_relu(3, stem // 2, 2), _conv_gn_relu(stem // 2, stem, 2))
        stages = []
        for in_c, out_c in zip(channels[:-1], channels[1:]):
            layers = [_conv_gn_relu(in_c, out_c, 2)]
            layers += [_conv_gn_relu(out_c, out_c, 1) for _ in range(convs_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.num_outputs = num_outputs
        outputs = range(num_stages - num_outputs, num_stages)
        self._out_features = [f"stage{i}" for i in outputs]
        self._out_feature_channels = {f"stage{i}": channels[i + 1] for i in outputs}
        self._out_feature_strides = {f"stage{i}": 2 ** (i + 3) for i in outputs}
        self._size_divisibility = 2 ** (num_stages + 2)
        frozen = [self.stem, *self.stages[:frozen_stages]] if frozen_stages >= 0 else []
        for module in frozen:
            module.requires_grad_(False)

    @property
    def size_divisibility(self) -> int:
        """The stride of the last stage."""
        return self._size_divisibility

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: [B, 3, H, W] normalised images.

        Returns:
            ``{"stage<i>": [B, channels[i + 1], H / 2^(i+3), W / 2^(i+3)]}`` for the last
            ``num_outputs`` stages (sizes rounded up).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        x = self.stem(images)
        outputs = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= len(self.stages) - self.num_outputs:
                outputs[f"stage{i}"] = x
        return outputs
