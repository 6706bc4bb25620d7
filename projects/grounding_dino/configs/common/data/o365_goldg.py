"""
Pre-training data mixing detection and grounding (the paper's O365 + GoldG setting):
Objects365 in ODVG format (detection: captions from category names, ``thing_classes`` from
its label map) concatenated with GoldG grounding data, as GLIP defines it: Flickr30k entities
(``flickr30k_train``) and MDETR's "mixed" captions without the COCO images
(``mixed_train_no_coco``: ``mdetr_annotations/final_mixed_train_no_coco.json`` with the GQA
images under ``gqa/images``). The mapper tells detection and grounding records apart by the
presence of a caption. Zero-shot COCO val2017 is the evaluation, prompting with the 80
category names.
"""

from detectron2.config import LazyCall as L

from grounding_dino.data.datasets import get_thing_classes

from .coco_detection import dataloader

dataloader.train.dataset.update(
    names=["objects365_train_odvg", "flickr30k_train", "mixed_train_no_coco"],
    # The grounding sets have no thing_classes: skip detectron2's class-name check.
    check_consistency=False,
)
# Category names of the detection part (grounding records carry their captions).
dataloader.train.mapper.thing_classes = L(get_thing_classes)(name="objects365_train_odvg")
dataloader.train.total_batch_size = 32
