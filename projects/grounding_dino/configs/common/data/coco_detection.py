"""
COCO 2017 detection for Grounding DINO: training captions name the categories present plus
random negatives (``GroundingDatasetMapper``); evaluation prompts with all 80 names and
scores COCO AP. Datasets are read from ``$DETECTRON2_DATASETS`` (see datasets/README.md).

The tokenizer and the token limit follow the model
(``model.prompt_encoder.tokenizer_name_or_path``, ``model.max_text_len``), so a config using
this file must define ``model``. The mapper tokenises each training caption once and hands the
ids to the model (``"input_ids"``).
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
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(GroundingDatasetMapper)(
        is_train=True,
        augmentations=L(build_train_augmentations)(),
        tokenizer="${model.prompt_encoder.tokenizer_name_or_path}",
        thing_classes=L(get_thing_classes)(name="${...dataset.names}"),
        image_format="RGB",
        max_text_len="${model.max_text_len}",
        max_categories=80,
        # Warn about dropped annotations (zero area, phrase past max_text_len tokens, category
        # not in the caption) at once, then at most once per reason every 1000 images.
        drop_warning_period=1000,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(GroundingDatasetMapper)(
        is_train=False,
        augmentations=L(build_test_augmentations)(),
        tokenizer="${model.prompt_encoder.tokenizer_name_or_path}",
        thing_classes=L(get_thing_classes)(name="${...dataset.names}"),
        image_format="RGB",
        max_text_len="${model.max_text_len}",
        drop_warning_period=1000,  # inference keeps no annotations: nothing is dropped
    ),
    num_workers=4,
)

dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)
