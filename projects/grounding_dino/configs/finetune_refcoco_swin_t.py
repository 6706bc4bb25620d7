"""
Fine-tunes Grounding DINO Swin-T on RefCOCO (referring expressions), a variant of
``finetune_coco_swin_t.py``: same model, optimizer and checkpoint, RefCOCO data, a shorter
schedule and a frozen BERT.

    python train_net.py --config-file configs/finetune_refcoco_swin_t.py --num-gpus 8
"""

from .common.data.refcoco import dataloader  # noqa: F401
from .finetune_coco_swin_t import lr_multiplier, model, optimizer, train  # noqa: F401

train.output_dir = "./output/finetune_refcoco_swin_t"
train.max_iter = 30000  # about 12 epochs of the 120k RefCOCO train expressions at batch 16
train.eval_period = 2500
train.checkpointer.period = 2500

# Expressions are short and specific: keep the pretrained language model as it is.
model.text_encoder.freeze = True
# One box per expression: fewer denoising queries are plenty.
model.dn_number = 50

lr_multiplier.warmup_iters = 500
