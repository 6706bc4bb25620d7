"""MM-Grounding-DINO Swin-B (mmdetection ``grounding_dino_swin-b_pretrain_obj365_goldg_v3det``,
``..._pretrain_all``): the Swin-T MM model with the swin_B_384_22k body (window 12), three
body levels plus one extra, as the official Swin-B."""

from .mm_grounding_dino_swin_t import model, train

model.backbone.variant = "swin_B_384_22k"
model.neck.in_channels = (256, 512, 1024)  # Swin-B stages 1-3
train.output_dir = "./output/mm_grounding_dino_swin_b"
