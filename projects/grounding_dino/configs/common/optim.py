"""
Optimizers. ``AdamW`` follows the paper: lr 1e-4, weight decay 1e-4, and 0.1x the learning
rate (1e-5) for the Swin backbone and BERT. Multipliers are plain numbers, so the config saves
as YAML; ``train_net.py`` fills in ``optimizer.params.model``.
"""

import torch
from detectron2.config import LazyCall as L

from grounding_dino.engine import get_param_groups

AdamW = L(torch.optim.AdamW)(
    params=L(get_param_groups)(
        base_lr="${..lr}",
        weight_decay_norm=None,  # the official training decays norm layers too
        backbone_lr_multiplier=0.1,  # parameters under backbone. (the image body)
        text_encoder_lr_multiplier=0.1,  # parameters under text_encoder.bert.
        lr_multipliers={},  # more {"name.prefix.": multiplier} pairs
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
