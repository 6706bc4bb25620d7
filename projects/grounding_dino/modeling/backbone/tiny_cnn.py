"""A small convolutional image backbone for CPU training (the synthetic shapes demo).

:class:`TinyConvNet` is a plain stack of 3x3 convolutions with GroupNorm and ReLU that
returns the maps of its last stages (e.g. strides 16, 32 and 64: coarse maps keep the
encoder's token count, and so the CPU time, small).
:class:`TinyCNNBackbone` plugs it into :class:`SwinImageBackbone` in place of the Swin
Transformer, so the input projections (conv + GroupNorm(32)), the extra stride-2 levels, the
sine position embeddings and the size-independent batching of
:meth:`SwinImageBackbone.forward_images` are the full model's own code. Its parameters are
named ``swin.*`` like the Swin they replace (``input_proj.*`` for the projections).

GroupNorm, not BatchNorm: the features of one image do not depend on the rest of its batch,
in training as in inference.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..registry import IMAGE_BACKBONE_REGISTRY
from .image_backbone import SwinImageBackbone

__all__ = ["TinyConvNet", "TinyCNNBackbone"]


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    groups = 8 if out_channels % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class TinyConvNet(nn.Module):
    """
    Stem (two stride-2 convs, stride 4) followed by one stage per entry of ``channels``
    after the first: a stride-2 conv and ``convs_per_stage - 1`` stride-1 convs.

    Args:
        channels: widths (stem at stride 4, then strides 8, 16, 32, ...).
        convs_per_stage: convolutions per stage (>= 1).
        num_outputs: the last ``num_outputs`` stages are returned (None: all stages).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 192),
        convs_per_stage: int = 2,
        num_outputs: Optional[int] = None,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(
                f"TinyConvNet needs at least 2 widths (stem + 1 stage), got {channels}"
            )
        if convs_per_stage < 1:
            raise ValueError(f"TinyConvNet convs_per_stage must be >= 1, got {convs_per_stage}")
        num_stages = len(channels) - 1
        num_outputs = num_stages if num_outputs is None else int(num_outputs)
        if not 1 <= num_outputs <= num_stages:
            raise ValueError(
                f"TinyConvNet num_outputs must be in [1, {num_stages}] for channels {channels}, "
                f"got {num_outputs}"
            )
        stem = channels[0]
        self.stem = nn.Sequential(_conv_gn_relu(3, stem // 2, 2), _conv_gn_relu(stem // 2, stem, 2))
        stages = []
        for in_c, out_c in zip(channels[:-1], channels[1:]):
            layers = [_conv_gn_relu(in_c, out_c, 2)]
            layers += [_conv_gn_relu(out_c, out_c, 1) for _ in range(convs_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.num_outputs = num_outputs
        self.out_channels = tuple(channels[-num_outputs:])
        self.size_divisibility = 2 ** (len(channels) + 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """
        Args:
            images: [B, 3, H, W] normalised images.

        Returns:
            ``num_outputs`` maps [B, channels[i], H / 2^(i+2), W / 2^(i+2)] for the last
            stages i (sizes rounded up).
        """
        x = self.stem(images)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[-self.num_outputs :]


@IMAGE_BACKBONE_REGISTRY.register()
class TinyCNNBackbone(SwinImageBackbone):
    """
    :class:`TinyConvNet` + the input projections and positions of :class:`SwinImageBackbone`.

    Args:
        channels, convs_per_stage, num_outputs: see :class:`TinyConvNet`.
        hidden_dim: channels of every output level (divisible by 32).
        num_feature_levels: output levels; those beyond the CNN's outputs are extra stride-2
            convs.
        pos_temperature: temperature of the sine position embedding.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 192),
        convs_per_stage: int = 2,
        num_outputs: Optional[int] = None,
        *,
        hidden_dim: int = 256,
        num_feature_levels: int = 4,
        pos_temperature: float = 20.0,
    ):
        body = TinyConvNet(channels, convs_per_stage, num_outputs)
        super().__init__(
            body,
            hidden_dim=hidden_dim,
            num_feature_levels=num_feature_levels,
            pos_temperature=pos_temperature,
        )
        self.size_divisibility = body.size_divisibility
