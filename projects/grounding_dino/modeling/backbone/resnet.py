"""detectron2's ResNet as Grounding DINO's image body (an alternative to Swin, for training).

Parameters are detectron2's (``stem.conv1.*``, ``res2.0.conv1.*``, ...), so the weights of an
ImageNet ResNet from detectron2's model zoo load under ``backbone.*`` (after converting the
``.pkl`` to a ``.pth`` of tensors).
"""

from typing import Sequence

from detectron2.modeling.backbone.resnet import BasicStem, ResNet

from ..registry import IMAGE_BACKBONE_REGISTRY

__all__ = ["ResNetBackbone"]

_STAGES = ("res2", "res3", "res4", "res5")


@IMAGE_BACKBONE_REGISTRY.register()
class ResNetBackbone(ResNet):
    """
    detectron2's ResNet (MSRA style: stride in the 1x1 conv of bottleneck blocks) returning
    the maps of ``out_features``.

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: stages to return, finest first, e.g. ("res3", "res4", "res5") (strides
            8, 16, 32).
        norm: "FrozenBN" (ImageNet statistics), "BN", "GN", ... (detectron2's ``get_norm``).
        freeze_at: detectron2's convention: 0 nothing; 1 the stem; k >= 2 also the first
            k - 1 stages (``res2`` ... ``res<k>``), their BatchNorms becoming frozen ones.
    """

    def __init__(self, *, depth: int, out_features: Sequence[str], norm: str, freeze_at: int):
        out_features = list(out_features)
        if not out_features or any(f not in _STAGES for f in out_features):
            raise ValueError(f"ResNet out_features {out_features} must be among {_STAGES}")
        if out_features != sorted(set(out_features), key=_STAGES.index):
            raise ValueError(f"ResNet out_features {out_features} must be finest first")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"ResNet freeze_at={freeze_at} not in [0, 5]")
        stem = BasicStem(in_channels=3, out_channels=64, norm=norm)
        extra = {"stride_in_1x1": True} if depth >= 50 else {}
        stages = ResNet.make_default_stages(depth, norm=norm, **extra)
        super().__init__(stem, stages, out_features=out_features, freeze_at=freeze_at)

    @property
    def size_divisibility(self) -> int:
        """The stride of the coarsest returned map."""
        return self._out_feature_strides[self._out_features[-1]]
