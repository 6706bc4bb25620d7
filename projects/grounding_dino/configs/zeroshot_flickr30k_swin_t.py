"""
Flickr30k entities phrase grounding (val) with the official Swin-T weights: Recall@1/5/10 per
phrase, MDETR's "any box" protocol (``dataloader.evaluator.merge_boxes=True``: "merged").

    python train_net.py --config-file configs/zeroshot_flickr30k_swin_t.py --eval-only \\
        train.init_checkpoint=weights/swin_t/model.pth train.device=cuda
"""

from grounding_dino.data import datasets  # noqa: F401  (registers flickr30k_*)

from .common.data.coco_detection import dataloader
from .grounding_dino_swin_t_ogc import model, train

model.box_threshold = 0.0  # every query is ranked for every phrase
dataloader.test.dataset.names = "flickr30k_val"
del dataloader.test.mapper["thing_classes"]  # captions carry their own text
dataloader.evaluator.tokenizer = "${model.prompt_encoder.tokenizer_name_or_path}"
dataloader.evaluator.merge_boxes = False
train.output_dir = "./output/zeroshot_flickr30k_swin_t"
train.init_checkpoint = "weights/swin_t/model.pth"
