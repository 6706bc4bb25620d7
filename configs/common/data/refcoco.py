"""
RefCOCO (MDETR annotations, UNC splits): referring-expression training with one box per
expression; evaluation reports Precision@1/5/10 at IoU 0.5 (``RECEvaluator``). Change the
split names for RefCOCO+ (``refcoco+_*``) or RefCOCOg (``refcocog_*``). Files live under
``$DETECTRON2_DATASETS`` (``mdetr_annotations/``, ``coco/train2014``).
"""

from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from omegaconf import OmegaConf

from grounding_dino.data import datasets  # noqa: F401  (registers refcoco*_*)
from grounding_dino.data.mapper import GroundingDatasetMapper
from grounding_dino.data.transforms import build_test_augmentations, build_train_augmentations
from grounding_dino.evaluation import build_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="refcoco_train", check_consistency=False),
    mapper=L(GroundingDatasetMapper)(
        is_train=True,
        augmentations=L(build_train_augmentations)(),
        tokenizer="${model.text_encoder.tokenizer_name_or_path}",
        image_format="RGB",
        max_text_len="${model.max_text_len}",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="refcoco_val", filter_empty=False),
    mapper=L(GroundingDatasetMapper)(
        is_train=False,
        augmentations=L(build_test_augmentations)(),
        tokenizer="${model.text_encoder.tokenizer_name_or_path}",
        image_format="RGB",
        max_text_len="${model.max_text_len}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)
