"""
Pre-training data mixing detection and grounding (the paper's O365 + GoldG setting):
Objects365 in ODVG format (detection: captions from category names, ``thing_classes`` from
its label map) concatenated with GoldG grounding data (Flickr30k entities; add the GQA part
of GoldG once it is registered, e.g. as an ODVG jsonl with ``register_odvg``). The mapper
tells detection and grounding records apart by the presence of a caption. Zero-shot COCO
val2017 is the evaluation, prompting with the 80 category names.
"""

from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from omegaconf import OmegaConf

from grounding_dino.data.datasets import get_thing_classes
from grounding_dino.data.mapper import GroundingDatasetMapper
from grounding_dino.data.transforms import build_test_augmentations, build_train_augmentations
from grounding_dino.evaluation import build_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=["objects365_train_odvg", "flickr30k_train"],
        # The grounding sets have no thing_classes: skip detectron2's class-name check.
        check_consistency=False,
    ),
    mapper=L(GroundingDatasetMapper)(
        is_train=True,
        augmentations=L(build_train_augmentations)(),
        tokenizer="${model.text_encoder.tokenizer_name_or_path}",
        # Category names of the detection part (grounding records carry their captions).
        thing_classes=L(get_thing_classes)(name="objects365_train_odvg"),
        image_format="RGB",
        max_text_len="${model.max_text_len}",
        max_categories=80,
    ),
    total_batch_size=32,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(GroundingDatasetMapper)(
        is_train=False,
        augmentations=L(build_test_augmentations)(),
        tokenizer="${model.text_encoder.tokenizer_name_or_path}",
        thing_classes=L(get_thing_classes)(name="${...dataset.names}"),
        image_format="RGB",
        max_text_len="${model.max_text_len}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)
