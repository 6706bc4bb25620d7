"""
Zero-shot COCO 2017 val with the official Swin-T weights (the paper's 48.4 AP).

    python -m grounding_dino.convert official groundingdino_swint_ogc.pth weights/swin_t
    python train_net.py --config-file configs/zeroshot_coco_swin_t.py --eval-only \\
        train.init_checkpoint=weights/swin_t/model.pth train.device=cuda

The prompt is all 80 category names (" . "-joined, chunked past 256 tokens); token scores map
to categories through the positive maps and the top 300 (query, category) pairs per image are
kept, as the official COCO evaluation. COCO AP uses COCOeval's default maxDets (100), as the
official evaluation does.
"""

from .common.data.coco_detection import dataloader
from .grounding_dino_swin_t_ogc import model, train

model.box_threshold = 0.0
model.max_detections = 300
dataloader.evaluator.max_dets_per_image = 100
dataloader.test.num_workers = 2
train.output_dir = "./output/zeroshot_coco_swin_t"
train.init_checkpoint = "weights/swin_t/model.pth"
