"""A detectron2 ResNet as Grounding DINO's image backbone (an alternative to Swin).

:class:`ResNetImageBackbone` plugs detectron2's ResNet into :class:`SwinImageBackbone` in place
of the Swin Transformer, so the input projections (conv + GroupNorm(32)), the extra
stride-2 level, the sine position embeddings and the batch-invariant
:meth:`SwinImageBackbone.forward_images` are the same code. Weights of an ImageNet ResNet from
detectron2's model zoo load under ``backbone.swin.*`` (e.g. with
``GroundingDINOCheckpointer`` after converting the ``.pkl`` to a ``.pth`` of tensors).
"""

from typing import List, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BasicStem, ResNet
from torch import nn

from ..registry import IMAGE_BACKBONE_REGISTRY
from .image_backbone import SwinImageBackbone

__all__ = ["ResNetBody", "ResNetImageBackbone"]


class ResNetBody(nn.Module):
    """
    detectron2's ResNet returning a list of maps, as the Swin body does.

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: stages to return, e.g. ("res3", "res4", "res5") (strides 8, 16, 32).
        norm: "FrozenBN" (ImageNet statistics), "BN", "GN", ...
        freeze_at: freeze the stem (1) and the first ``freeze_at - 1`` stages (0: nothing).
    """

    def __init__(
        self,
        depth: int = 50,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
    ):
        super().__init__()
        stem = BasicStem(in_channels=3, out_channels=64, norm=norm)
        bottleneck = depth >= 50
        stages = ResNet.make_default_stages(
            depth,
            norm=norm,
            **({"stride_in_1x1": True} if bottleneck else {}),
        )
        self.resnet = ResNet(stem, stages, out_features=list(out_features)).freeze(freeze_at)
        self.out_features = list(out_features)
        shapes = self.resnet.output_shape()
        self._out_channels = [shapes[name].channels for name in self.out_features]
        self.size_divisibility = shapes[self.out_features[-1]].stride

    @property
    def out_channels(self) -> List[int]:
        return list(self._out_channels)

    def output_shape(self) -> List[ShapeSpec]:
        shapes = self.resnet.output_shape()
        return [shapes[name] for name in self.out_features]

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """[B, 3, H, W] -> one [B, C_i, H_i, W_i] map per ``out_features`` entry."""
        outputs = self.resnet(images)
        return [outputs[name] for name in self.out_features]


@IMAGE_BACKBONE_REGISTRY.register()
class ResNetImageBackbone(SwinImageBackbone):
    """:class:`ResNetBody` + the input projections and positions of :class:`SwinImageBackbone`."""

    def __init__(
        self,
        depth: int = 50,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        *,
        hidden_dim: int = 256,
        num_feature_levels: int = 4,
        pos_temperature: float = 20.0,
    ):
        body = ResNetBody(depth, out_features, norm, freeze_at)
        super().__init__(
            body,
            hidden_dim=hidden_dim,
            num_feature_levels=num_feature_levels,
            pos_temperature=pos_temperature,
        )
        self.size_divisibility = body.size_divisibility
