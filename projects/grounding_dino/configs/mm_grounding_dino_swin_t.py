"""MM-Grounding-DINO Swin-T (mmdetection ``configs/mm_grounding_dino/
grounding_dino_swin-t_pretrain_*.py``; transformers ``mm-grounding-dino``): the official Swin-T
model with one class and one box head per decoder layer.

Every published MM-Grounding-DINO-T (pre-trained on O365; O365+GoldG; +GRIT; +V3Det;
+GRIT+V3Det) has this structure; they differ only in their weights. The heads are
MM-Grounding-DINO's contrastive head: logits / sqrt(C) (a constant) plus a learned bias, on
every decoder layer (``model.head``, a list) and on the encoder proposals
(``model.query_selector.head``). Text encoder bert-base-uncased, images resized to shortest
edge 800 / longest 1333, as the official model (mmdet's ``FixScaleResize(800, 1333)``).

    python -m grounding_dino.convert mmdet \\
        grounding_dino_swin-t_pretrain_obj365_goldg_grit9m_v3det_20231204_095047-b448804b.pth \\
        weights/mm_gdino_t
    python -m grounding_dino.convert hf mm_grounding_dino_tiny_o365v1_goldg_v3det weights/mm_t
"""

import math

from detectron2.config import LazyCall as L

from grounding_dino.modeling.head import ContrastiveHead, layer_heads

from .grounding_dino_swin_t_ogc import model, train

# -log((1 - p) / p), p = 0.01: mmdet's and transformers' initial bias (scores start near 1%).
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)

model.decoder.per_layer_box_heads = True
model.head = L(layer_heads)(
    head=L(ContrastiveHead)(
        max_text_len="${...max_text_len}",
        bias_init=PRIOR_BIAS,
        log_scale_init=None,
        fixed_scale=True,
    ),
    num_layers="${..decoder.num_layers}",
)
model.query_selector.head.update(bias_init=PRIOR_BIAS, fixed_scale=True)
train.output_dir = "./output/mm_grounding_dino_swin_t"
