"""MM-Grounding-DINO Swin-L (mmdetection ``grounding_dino_swin-l_pretrain_obj365_goldg``,
``..._pretrain_all``): the swin_L_384_22k body (window 12) with all four stages as feature
levels plus one extra: 5 levels in the neck, the feature enhancer and the decoder (mmdet's
``num_levels = 5``), where the Swin-T and Swin-B models use stages 1-3 and 4 levels."""

from .mm_grounding_dino_swin_t import model, train

model.backbone.update(variant="swin_L_384_22k", out_indices=(0, 1, 2, 3))
model.neck.in_channels = (192, 384, 768, 1536)  # Swin-L stages 0-3
model.num_feature_levels = 5
train.output_dir = "./output/mm_grounding_dino_swin_l"
