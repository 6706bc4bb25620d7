"""
A small box-prompted segmenter (transformers' ``SamModel``, about 0.37M parameters) trained
from scratch on the CPU on the synthetic shapes' exact masks: the mask stage of ``make demo``.

SAM's recipe at a small size: one mask per box prompt (the ground truth box jittered by 10% of
its side, at most 2% of the image), focal + dice loss on the mask logits and the IoU head's
squared error (``grounding_dino.segment.loss``; focal weighted 2:1 here, SAM's 20:1 learns
slower from scratch, see below). The processor resizes the 256 px shapes to 128 px (longest
side to ``image_size``, then pads); the image encoder is a 2-layer ViT on 8 px patches, so the
mask decoder predicts 64x64 masks, one mask pixel per 2x2 input pixels. An 8 px patch holds
little enough that the encoder learns each pixel's side of a shape's edge within a few hundred
iterations; 16 px patches at 256 px learned it far slower at the same cost.

Train with::

    python train_net.py --config-file configs/sam_shapes.py train.max_iter=350

The trained segmenter is written to ``train.output_dir/sam`` as a transformers folder
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``) that ``--sam`` loads::

    python train_net.py --config-file configs/shapes_tiny.py --eval-only \\
        --sam output/sam_shapes/sam train.init_checkpoint=output/demo/model_final.pth
"""

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.solver import get_default_optimizer_params
import torch

from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.segment.data import SamBoxMapper
from grounding_dino.segment.training import (
    SamForBoxTraining,
    SaveSamFolder,
    build_sam,
    sam_processor,
)

from .common.schedule import lr_multiplier
from .common.train import train

shapes = dict(image_size=256, num_train=2000, num_val=200)
register_shapes_datasets(**shapes, generate=False)

IMAGE_SIZE = 128
PATCH = 8
EMBED = 64  # the image embedding's channels and the prompt encoder / mask decoder width

model = L(SamForBoxTraining)(
    sam=L(build_sam)(
        # Smoother position codes than SAM's std 1: at this size a new model learns sooner
        # which pixels a box encloses (docs/training.md, the demo job, compares them).
        position_scale=0.5,
        config=dict(
            vision_config=dict(
                hidden_size=64,
                output_channels=EMBED,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=IMAGE_SIZE,
                patch_size=PATCH,
                window_size=8,
                global_attn_indexes=[1],
                mlp_dim=256,
                num_pos_feats=EMBED // 2,
            ),
            prompt_encoder_config=dict(
                hidden_size=EMBED, image_size=IMAGE_SIZE, patch_size=PATCH, mask_input_channels=8
            ),
            mask_decoder_config=dict(
                hidden_size=EMBED,
                mlp_dim=4 * EMBED,
                num_hidden_layers=2,
                # 16 dimensions per head as in SAM (256 / 2 / 8); fewer cannot tell where a
                # pixel is from where the box's corners are.
                num_attention_heads=4,
                attention_downsample_rate=1,
                iou_head_hidden_dim=EMBED,
            ),
        ),
    ),
    processor=L(sam_processor)(image_size=IMAGE_SIZE),
    # SAM weighs focal 20 : dice 1. From scratch the focal term first drives every logit
    # negative (an empty mask) and the dice term only then finds the shapes; at 2 : 1 the
    # dice loss was 0.79 after 100 iterations (batch 8) against 0.93 at 20 : 1 (batch 4).
    focal_weight=2.0,
    dice_weight=1.0,
    iou_weight=1.0,
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="shapes_train", filter_empty=True),
        mapper=L(SamBoxMapper)(
            processor="${model.processor}",
            max_boxes=8,
            box_noise=0.1,
            box_noise_max=0.02,
            seed="${train.seed}",  # the same prompts on every run: the demo is reproducible
        ),
        total_batch_size=8,
        aspect_ratio_grouping=False,  # every input is padded to the same square
        num_workers=1,  # the processor resizes the next batch while the model trains
    )
)

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=3e-3,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

lr_multiplier.warmup_iters = 20
lr_multiplier.steps = [0.8]

train.output_dir = "./output/sam_shapes"
train.device = "cpu"
train.max_iter = 350
train.eval_period = -1  # no detector evaluator here: segm AP comes with the detector's boxes
train.checkpointer.update(period=1000, max_to_keep=1)
train.log_period = 20
train.clip_grad.update(enabled=True, max_norm=1.0)
train.seed = 0
# The prompt encoder's point and mask embeddings get no gradient from box prompts.
train.ddp.find_unused_parameters = True
train.hooks = [L(SaveSamFolder)(folder="${train.output_dir}/sam")]
