"""
Fine-tunes a SAM (a transformers ``SamModel`` folder, e.g. ``facebook/sam-vit-base`` downloaded
or converted with ``python -m grounding_dino.segment.convert``) on your own masks in COCO format,
prompted with your boxes, from the command line only::

    python train_net.py --config-file configs/finetune_sam_coco_format.py \\
        sam.path=weights/sam-vit-base \\
        dataset.train_json=data/cells/train.json dataset.train_images=data/cells/images

``dataset.train_json`` is a COCO-format file whose annotations have a ``segmentation``
(polygons or RLE, as ``python -m grounding_dino.label`` writes) and a ``bbox``;
``dataset.train_images`` is the folder its ``file_name`` are relative to. Annotations without
a mask and crowd regions are skipped; an image without any is skipped (the first few are
logged).

The defaults, and why (override any of them after the flags):

* **The image encoder is frozen** (``train.freeze``): the prompt encoder and mask decoder are
  fine-tuned, as MedSAM-style recipes do for a small dataset; SAM ViT-B's image encoder holds
  89M of its 94M parameters and most of the memory (``'train.freeze=[]'`` trains it too).
* **SAM's loss**: focal + dice (20:1) on the mask logits and the IoU head's squared error;
  box prompts are your boxes jittered by 10% of their side (at most 2% of the image).
* **lr 1e-4, 2000 iterations, batch 4, at most 16 masks per image, one GPU**; checkpoints every
  500 iterations.

Results go to ``train.output_dir`` (``./output/finetune_sam``): ``model_final.pth`` and
``metrics.json`` as for any training, and ``sam/``: the fine-tuned SAM as a transformers folder
that ``--sam output/finetune_sam/sam`` loads (docs/segmentation.md).
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.solver import get_default_optimizer_params

from grounding_dino.data.datasets import register_coco_format
from grounding_dino.segment.data import SamBoxMapper
from grounding_dino.segment.training import (
    SamForBoxTraining,
    SaveSamFolder,
    build_sam,
    sam_processor,
)

from .common.schedule import lr_multiplier
from .common.train import train

sam = dict(path=None)  # your SAM folder (config.json, model.safetensors, preprocessor_config.json)
dataset = dict(
    name="my_masks",
    train_json=None,  # COCO-format annotations with "segmentation"
    train_images=None,  # the folder of the images
)

model = L(SamForBoxTraining)(
    sam=L(build_sam)(path="${sam.path}"),
    processor=L(sam_processor)(path="${sam.path}"),
    focal_weight=20.0,
    dice_weight=1.0,
    iou_weight=1.0,
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(
            names=L(register_coco_format)(
                name="${dataset.name}_train",
                json_file="${dataset.train_json}",
                image_root="${dataset.train_images}",
                json_key="dataset.train_json",
                images_key="dataset.train_images",
            ),
            filter_empty=True,
        ),
        mapper=L(SamBoxMapper)(processor="${model.processor}", max_boxes=16),
        total_batch_size=4,
        aspect_ratio_grouping=False,  # every input is padded to the processor's square
        num_workers=4,
    )
)

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

lr_multiplier.warmup_iters = 50
lr_multiplier.steps = [0.75]

train.output_dir = "./output/finetune_sam"
train.max_iter = 2000
train.eval_period = -1  # mask AP needs a detector's boxes: train_net.py --eval-only --sam
train.checkpointer.update(period=500, max_to_keep=2)
train.clip_grad.update(enabled=True, max_norm=1.0)
train.freeze = ["sam.vision_encoder.*"]
# The prompt encoder's point and mask embeddings get no gradient from box prompts.
train.ddp.find_unused_parameters = True
train.hooks = [L(SaveSamFolder)(folder="${train.output_dir}/sam")]
