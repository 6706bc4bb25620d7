"""
RefCOCO (MDETR annotations, UNC splits): referring-expression training with one box per
expression; evaluation reports Precision@1/5/10 at IoU 0.5 (``RECEvaluator``). Change the
split names for RefCOCO+ (``refcoco+_*``) or RefCOCOg (``refcocog_*``). Files live under
``$DETECTRON2_DATASETS`` (``mdetr_annotations/``, ``coco/train2014``).
"""

from grounding_dino.data import datasets  # noqa: F401  (registers refcoco*_*)

from .coco_detection import dataloader

# Every record carries its own expression: no category names, no class-name check.
dataloader.train.dataset.update(names="refcoco_train", check_consistency=False)
dataloader.test.dataset.names = "refcoco_val"
for mapper in (dataloader.train.mapper, dataloader.test.mapper):
    del mapper["thing_classes"]
del dataloader.train.mapper["max_categories"]
