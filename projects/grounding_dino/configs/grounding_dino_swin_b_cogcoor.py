"""Grounding DINO Swin-B (official ``GroundingDINO_SwinB_cfg.py``): the Swin-T model with the
swin_B_384_22k backbone (``groundingdino_swinb_cogcoor.pth``)."""

from .grounding_dino_swin_t_ogc import model, train

model.backbone.variant = "swin_B_384_22k"
model.neck.in_channels = (256, 512, 1024)  # Swin-B stages 1-3
train.output_dir = "./output/grounding_dino_swin_b_cogcoor"
