"""Grounding DINO Swin-T (GroundingDINO_SwinT_OGC): the whole model tree.

This file is the one source of truth for the model's values: the constructors take required
keyword-only arguments, as detectron2's ``GeneralizedRCNN``. Values equal the official config;
``${...}`` interpolation ties shared sizes together.

The inference knobs sit at the top of ``model``: ``model.box_threshold``,
``model.text_threshold``, ``model.max_detections``.

The five swappable components are built through their registries by ``name`` (see
``grounding_dino.modeling.registry``): ``model.backbone.name``, ``model.text_encoder.name``,
``model.enhancer.name``, ``model.query_selector.name``, ``model.decoder.name``. A dotted name
(``my_package.module.MyEnhancer``) imports its module first.
"""

from detectron2.config import LazyCall as L

from grounding_dino.modeling import (
    GroundingDINO,
    build_decoder,
    build_enhancer,
    build_image_backbone,
    build_query_selector,
    build_text_encoder,
)
from grounding_dino.modeling.backbone import InputProjectionNeck, PositionEmbeddingSine
from grounding_dino.modeling.criterion import GroundingCriterion
from grounding_dino.modeling.head import ContrastiveHead
from grounding_dino.modeling.matcher import HungarianMatcher
from grounding_dino.text import PromptEncoder

model = L(GroundingDINO)(
    # ---- inference knobs
    box_threshold=0.35,  # keep boxes whose best token score exceeds this
    text_threshold=0.25,  # tokens above this score form a box's phrase
    max_detections=300,  # at most this many boxes per image
    # ---- sizes the components share
    hidden_dim=256,
    num_feature_levels=4,
    max_text_len=256,
    # ---- image side: body (a detectron2 Backbone), input projections, position embedding
    backbone=L(build_image_backbone)(
        name="SwinBackbone",
        variant="swin_T_224_1k",
        out_indices=(1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,  # -1: nothing; 0-1: the patch embedding; k >= 2: also stages 0..k-2
        use_checkpoint=False,
    ),
    neck=L(InputProjectionNeck)(
        in_channels=(192, 384, 768),  # the body's output channels (checked at build)
        hidden_dim="${..hidden_dim}",
        num_feature_levels="${..num_feature_levels}",
    ),
    position_embedding=L(PositionEmbeddingSine)(
        hidden_dim="${..hidden_dim}",
        temperature=20.0,
    ),
    # ---- text side
    prompt_encoder=L(PromptEncoder)(
        tokenizer_name_or_path="${..text_encoder.name_or_path}",
        max_text_len="${..max_text_len}",
        # Classes per pass of a category list (LVIS's 1203): None = as many as fit in
        # max_text_len tokens (the official protocol); 40 = mmdetection's (docs/evaluation.md).
        classes_per_prompt=None,
    ),
    text_encoder=L(build_text_encoder)(
        name="BertTextEncoder",
        name_or_path="bert-base-uncased",
        hidden_dim="${..hidden_dim}",
        pretrained=True,
        bert_config=None,
        bert_position_offset=0,
        freeze=False,
        # Text features of this many prompt runs are kept for reuse in eval mode without
        # gradients (a fixed class list over many images is encoded once); 0 disables it.
        cache_size=64,
    ),
    # ---- transformer
    enhancer=L(build_enhancer)(
        name="FeatureEnhancer",
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
        use_checkpoint=False,  # activation checkpointing of every layer (less training memory)
    ),
    query_selector=L(build_query_selector)(
        name="LanguageGuidedQuerySelector",
        d_model="${..hidden_dim}",
        num_queries=900,
        head=L(ContrastiveHead)(
            max_text_len="${...max_text_len}", bias_init=None, log_scale_init=None
        ),
    ),
    decoder=L(build_decoder)(
        name="CrossModalityDecoder",
        num_layers=6,
        d_model="${..hidden_dim}",
        num_heads=8,
        ffn_dim=2048,
        num_levels="${..num_feature_levels}",
        num_points=4,
        dropout=0.0,
        use_checkpoint=False,  # as the enhancer's
    ),
    head=L(ContrastiveHead)(max_text_len="${..max_text_len}", bias_init=None, log_scale_init=None),
    # ---- training
    criterion=L(GroundingCriterion)(
        matcher=L(HungarianMatcher)(
            cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
        losses=("labels", "boxes"),
    ),
    dn_number=100,
    dn_label_noise_ratio=0.5,
    dn_box_noise_scale=1.0,
    # ---- input
    pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375),
    input_format="RGB",
)
