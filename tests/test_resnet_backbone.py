"""The detectron2 ResNet and the tiny CNN bodies: levels through the neck, batch invariance and
freezing."""

import pytest
import torch

from grounding_dino.model_zoo import get_config
from grounding_dino.modeling.backbone import InputProjectionNeck, ResNetBackbone, TinyCNNBackbone


def _resnet18(freeze_at=0):
    return ResNetBackbone(
        depth=18, out_features=("res3", "res4", "res5"), norm="FrozenBN", freeze_at=freeze_at
    )


def test_resnet_levels_and_batch_invariance():
    torch.manual_seed(0)
    body = _resnet18().eval()
    assert body.size_divisibility == 32
    shapes = body.output_shape()
    assert [(n, s.channels, s.stride) for n, s in shapes.items()] == [
        ("res3", 128, 8), ("res4", 256, 16), ("res5", 512, 32),
    ]  # fmt: skip
    neck = InputProjectionNeck(in_channels=(128, 256, 512), hidden_dim=64, num_feature_levels=4)
    neck.check_backbone(body)
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 96)]
    with torch.no_grad():
        maps, masks = neck.forward_images(body, images)
        alone, _ = neck.forward_images(body, images[1:])
    # res3, res4, res5 (strides 8, 16, 32) and one stride-2 conv level (stride 64).
    assert [tuple(f.shape[-2:]) for f in maps] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert all(f.shape[1] == 64 for f in maps)
    for level, (batched, single) in enumerate(zip(maps, alone)):
        h, w = single.shape[-2:]
        assert torch.allclose(batched[1, :, :h, :w], single[0], atol=1e-5), level
        assert masks[level][1, :h, :w].all() and not masks[level][1].all()


@pytest.mark.parametrize(
    "freeze_at, frozen_prefixes", [(0, ()), (1, ("stem.",)), (3, ("stem.", "res2.", "res3."))]
)
def test_resnet_freeze_at(freeze_at, frozen_prefixes):
    body = _resnet18(freeze_at)
    names = [n for n, _ in body.named_parameters()]
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if n.startswith(frozen_prefixes)}
    assert len(frozen) < len(names)
    with pytest.raises(ValueError, match="finest first"):
        ResNetBackbone(depth=18, out_features=("res5", "res3"), norm="FrozenBN", freeze_at=0)


def _tiny(frozen_stages):
    return TinyCNNBackbone(
        channels=(16, 32, 64, 128, 192), convs_per_stage=2, num_outputs=3,
        frozen_stages=frozen_stages,
    )  # fmt: skip


def test_tiny_cnn_levels_and_batch_invariance():
    torch.manual_seed(0)
    body = _tiny(-1).eval()
    assert body.size_divisibility == 64
    shapes = body.output_shape()
    assert [(n, s.channels, s.stride) for n, s in shapes.items()] == [
        ("stage1", 64, 16), ("stage2", 128, 32), ("stage3", 192, 64),
    ]  # fmt: skip
    neck = InputProjectionNeck(in_channels=(64, 128, 192), hidden_dim=64, num_feature_levels=4)
    images = [torch.randn(3, 256, 192), torch.randn(3, 128, 256)]
    with torch.no_grad():
        maps, masks = neck.forward_images(body, images)
        alone, _ = neck.forward_images(body, images[1:])
    assert [tuple(f.shape[-2:]) for f in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for batched, single in zip(maps, alone):
        h, w = single.shape[-2:]
        torch.testing.assert_close(batched[1, :, :h, :w], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "frozen_stages, frozen_prefixes",
    [(-1, ()), (0, ("stem.",)), (2, ("stem.", "stages.0.", "stages.1."))],
)
def test_tiny_cnn_frozen_stages(frozen_stages, frozen_prefixes):
    body = _tiny(frozen_stages)
    names = [n for n, _ in body.named_parameters()]
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if n.startswith(frozen_prefixes)}
    # A frozen stem gets no gradient; the trainable stages do.
    sum(o.sum() for o in body.train()(torch.randn(1, 3, 64, 64)).values()).backward()
    assert all((p.grad is None) == (n in frozen) for n, p in body.named_parameters())


def test_r50_config_builds_and_freezes_early_stages(minilm_dir):
    from detectron2.config import instantiate

    cfg = get_config("grounding_dino_r50.py")
    backbone = instantiate(cfg.model.backbone)
    assert isinstance(backbone, ResNetBackbone)
    frozen = {n.split(".")[0] for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}
    instantiate(cfg.model.neck).check_backbone(backbone)
