"""Grounding DINO with a detectron2 ResNet-50 image backbone (res3-res5 + one extra level),
otherwise the Swin-T model. For training; there are no official R-50 weights."""

from detectron2.config import LazyCall as L

from grounding_dino.modeling import build_image_backbone

from .grounding_dino_swin_t_ogc import model, train

model.backbone = L(build_image_backbone)(
    name="ResNetBackbone",
    depth=50,
    out_features=("res3", "res4", "res5"),
    norm="FrozenBN",
    freeze_at=2,
)
model.neck.in_channels = (512, 1024, 2048)  # res3, res4, res5
train.output_dir = "./output/grounding_dino_r50"
