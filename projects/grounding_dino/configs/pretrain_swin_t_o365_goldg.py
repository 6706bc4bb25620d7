"""
Pre-training-style Grounding DINO Swin-T on Objects365 (detection, ODVG) + GoldG
(grounding): the paper's "O365 + GoldG" setting. Both kinds of records go through the same
mapper and model; detection images get captions built from category names. Zero-shot COCO
val2017 is evaluated every ``train.eval_period``.

    python train_net.py --config-file configs/pretrain_swin_t_o365_goldg.py \\
        --num-gpus 8 --num-machines 2 --machine-rank R --dist-url tcp://HOST:PORT

The model starts from ImageNet Swin-T and pretrained BERT (``train.init_checkpoint`` may name
converted Swin weights); nothing comes from an official Grounding DINO checkpoint.
"""

from .common.data.o365_goldg import dataloader
from .common.models.grounding_dino_swin_t import model  # noqa: F401
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier
from .common.train import train

train.init_checkpoint = ""
train.output_dir = "./output/pretrain_swin_t_o365_goldg"
train.max_iter = 600000  # about 24 epochs of O365 + GoldG at batch 32
train.eval_period = 20000
train.checkpointer.period = 10000

dataloader.train.total_batch_size = 32
dataloader.train.num_workers = 8

optimizer.lr = 1e-4
lr_multiplier.steps = [2 / 3, 8 / 9]
lr_multiplier.warmup_iters = 2000
