"""
Pre-training-style Grounding DINO Swin-T on Objects365 (detection, ODVG) + GoldG
(grounding): the paper's "O365 + GoldG" setting. Both kinds of records go through the same
mapper and model; detection images get captions built from category names. Zero-shot COCO
val2017 is evaluated every ``train.eval_period``.

    python train_net.py --config-file configs/pretrain_swin_t_o365_goldg.py \\
        --num-gpus 8 --num-machines 2 --machine-rank R --dist-url tcp://HOST:PORT

The model starts from ImageNet Swin-T and pretrained BERT (``train.init_checkpoint`` may name
converted Swin weights, keys ``backbone.*``); nothing comes from an official Grounding DINO
checkpoint. ``train.init_partial`` lists what such a checkpoint may leave out: the detector's
per-stage norms (``backbone.norm<i>``) and everything after the image body (BERT keeps its
pretrained weights); any other missing, unexpected or wrong-shape key is an error.

ImageNet Swin-T weights (the official release file or a timm ``swin_*`` state dict)::

    python -m grounding_dino.convert swin swin_tiny_patch4_window7_224.pth weights/swin_t_in1k
    python train_net.py --config-file configs/pretrain_swin_t_o365_goldg.py \\
        train.init_checkpoint=weights/swin_t_in1k/model.pth

(an unconverted release file also works as ``train.init_checkpoint``: it is converted in memory).
"""

from .common.data.o365_goldg import dataloader
from .common.models.grounding_dino_swin_t import model  # noqa: F401
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier
from .common.train import train

train.init_checkpoint = ""
train.init_partial = [
    "backbone.norm",
    "neck.",
    "text_encoder.",
    "enhancer.",
    "query_selector.",
    "decoder.",
    "head.",
]
train.output_dir = "./output/pretrain_swin_t_o365_goldg"
train.max_iter = 600000  # about 24 epochs of O365 + GoldG at batch 32
train.eval_period = 20000
train.checkpointer.period = 10000

dataloader.train.total_batch_size = 32
dataloader.train.num_workers = 8

optimizer.lr = 1e-4
lr_multiplier.steps = [2 / 3, 8 / 9]
lr_multiplier.warmup_iters = 2000
