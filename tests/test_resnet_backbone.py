"""The detectron2 ResNet option of the image backbone."""

import torch
from detectron2.config import LazyConfig, instantiate

from grounding_dino.modeling.backbone import ResNetImageBackbone


def test_resnet_levels_and_batch_invariance():
    torch.manual_seed(0)
    backbone = ResNetImageBackbone(depth=18, hidden_dim=64, num_feature_levels=4).eval()
    assert backbone.size_divisibility == 32
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 96)]
    with torch.no_grad():
        features, masks, pos = backbone.forward_images(images)
        alone, _, _ = backbone.forward_images(images[1:])
    # res3, res4, res5 (strides 8, 16, 32) and one stride-2 conv level (stride 64).
    assert [tuple(f.shape[-2:]) for f in features] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert all(f.shape[1] == 64 for f in features)
    for level, (batched, single) in enumerate(zip(features, alone)):
        h, w = single.shape[-2:]
        assert torch.allclose(batched[1, :, :h, :w], single[0], atol=1e-5), level
        assert masks[level][1, :h, :w].all() and not masks[level][1].all()


def test_r50_config_builds_and_freezes_early_stages(minilm_dir):
    cfg = LazyConfig.load("configs/grounding_dino_r50.py")
    cfg.model.text_encoder.update(name_or_path=minilm_dir)
    cfg.model.query_selector.num_queries = 20
    backbone = instantiate(cfg.model.backbone)
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert any(n.startswith("swin.resnet.stem") for n in frozen)
    assert any(n.startswith("swin.resnet.res2") for n in frozen)
    assert not any(n.startswith("swin.resnet.res3") for n in frozen)
