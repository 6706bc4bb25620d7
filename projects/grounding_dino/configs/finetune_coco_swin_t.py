"""
Fine-tunes Grounding DINO Swin-T on COCO 2017, starting from the converted official
``groundingdino_swint_ogc.pth``.

Convert the official checkpoint first (safe loading, no pickled code)::

    python -m grounding_dino.convert official groundingdino_swint_ogc.pth \\
        output/converted/swint_ogc

then train (8 GPUs, 2 images each; AMP; 12 epochs = 90k iterations, LR drop at 11/12)::

    python train_net.py --config-file configs/finetune_coco_swin_t.py --num-gpus 8

Any field can be overridden after the flags, e.g. ``train.init_checkpoint=...``,
``model.text_encoder.freeze=True``, ``dataloader.train.total_batch_size=8``.
"""

from .common.data.coco_detection import dataloader
from .common.models.grounding_dino_swin_t import model  # noqa: F401
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier
from .common.train import train

train.init_checkpoint = "output/converted/swint_ogc/model.pth"
# The converted checkpoint must match the model exactly (an error names any missing,
# unexpected or wrong-shape key). True, or a list of key prefixes, lets those keys keep the
# model's initialisation instead (e.g. ["query_selector.tgt_embed."] after changing
# model.query_selector.num_queries); what was not loaded is then logged.
train.init_partial = False
train.output_dir = "./output/finetune_coco_swin_t"
train.max_iter = 90000
train.eval_period = 5000
train.checkpointer.period = 5000

dataloader.train.total_batch_size = 16

optimizer.lr = 1e-4
optimizer.params.backbone_lr_multiplier = 0.1
optimizer.params.text_encoder_lr_multiplier = 0.1

lr_multiplier.steps = [11 / 12]
lr_multiplier.warmup_iters = 1000
