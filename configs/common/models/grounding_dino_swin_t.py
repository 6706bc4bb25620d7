"""Grounding DINO Swin-T (GroundingDINO_SwinT_OGC): the whole model tree.

Values equal the official config; ``${...}`` interpolation ties shared sizes together. The
inference knobs sit at the top of ``model``: ``model.box_threshold``,
``model.text_threshold``, ``model.max_detections``.
"""

from detectron2.config import LazyCall as L

from grounding_dino.modeling import (
    BertTextEncoder,
    CrossModalityDecoder,
    FeatureEnhancer,
    GroundingDINO,
    LanguageGuidedQuerySelector,
)
from grounding_dino.modeling.backbone import SwinImageBackbone
from grounding_dino.modeling.criterion import GroundingCriterion
from grounding_dino.modeling.matcher import HungarianMatcher

model = L(GroundingDINO)(
    box_threshold=0.35,
    text_threshold=0.25,
    max_detections=300,
    max_text_len=256,
    hidden_dim=256,
    num_feature_levels=4,
    backbone=L(SwinImageBackbone)(
        swin="swin_T_224_1k",
        out_indices=(1, 2, 3),
        hidden_dim="${..hidden_dim}",
        num_feature_levels="${..num_feature_levels}",
        drop_path_rate=0.2,
        pos_temperature=20.0,
    ),
    text_encoder=L(BertTextEncoder)(
        name_or_path="bert-base-uncased",
        tokenizer_name_or_path="${.name_or_path}",
        hidden_dim="${..hidden_dim}",
        max_text_len="${..max_text_len}",
        pretrained=True,
    ),
    enhancer=L(FeatureEnhancer)(
        num_layers=6,
        d_model="${..hidden_dim}",
        num_levels="${..num_feature_levels}",
        ffn_dim=2048,
        num_heads=8,
        num_points=4,
        text_heads=4,
        text_ffn_dim=1024,
        fusion_dim=1024,
        fusion_heads=4,
        dropout=0.0,
        fusion_drop_path=0.1,
    ),
    query_selector=L(LanguageGuidedQuerySelector)(
        d_model="${..hidden_dim}",
        num_queries=900,
        max_text_len="${..max_text_len}",
    ),
    decoder=L(CrossModalityDecoder)(
        num_layers=6,
        d_model="${..hidden_dim}",
        num_heads=8,
        ffn_dim=2048,
        num_levels="${..num_feature_levels}",
        num_points=4,
        dropout=0.0,
    ),
    criterion=L(GroundingCriterion)(
        matcher=L(HungarianMatcher)(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    ),
    dn_number=100,
    dn_label_noise_ratio=0.5,
    dn_box_noise_scale=1.0,
    input_format="RGB",
)
