"""Choose an evaluator from a dataset's ``metadata.evaluator_type``."""

from detectron2.data import MetadataCatalog

from .detection import ZeroShotDetectionEvaluator, ZeroShotLVISEvaluator
from .flickr30k import Flickr30kEvaluator
from .rec import RECEvaluator

__all__ = ["EVALUATOR_TYPES", "register_evaluator_type", "build_evaluator"]

EVALUATOR_TYPES = {
    "coco": ZeroShotDetectionEvaluator,
    "lvis": ZeroShotLVISEvaluator,
    "rec": RECEvaluator,
    "flickr30k": Flickr30kEvaluator,
}
"""evaluator_type -> evaluator class taking ``(dataset_name, output_dir=None, **kwargs)``."""


def register_evaluator_type(evaluator_type):
    """Decorator mapping ``metadata.evaluator_type == evaluator_type`` to a class.

    Example::

        @register_evaluator_type("flickr30k")
        class Flickr30kEvaluator(DatasetEvaluator): ...
    """

    def deco(cls):
        if evaluator_type in EVALUATOR_TYPES:
            raise KeyError(
                f"evaluator_type '{evaluator_type}' is already registered to "
                f"{EVALUATOR_TYPES[evaluator_type].__name__}."
            )
        EVALUATOR_TYPES[evaluator_type] = cls
        return cls

    return deco


def build_evaluator(dataset_name, output_dir=None, **kwargs):
    """Build the evaluator for a registered dataset.

    Args:
        dataset_name (str): a dataset registered in detectron2's catalogs. Its metadata's
            ``evaluator_type`` ("coco", "lvis", "rec", "flickr30k", or one added with
            :func:`register_evaluator_type`) picks the evaluator; ``register_coco_instances``
            sets "coco", ``register_lvis_instances`` sets "lvis", ``register_mdetr`` sets
            "rec" or "flickr30k".
        output_dir (str or None): where the evaluator may dump predictions.
        **kwargs: passed to the evaluator (e.g. ``max_dets_per_image``, ``fixed_ap``; the
            Flickr30k evaluator needs ``tokenizer``, the model's tokenizer name or folder).

    Returns:
        DatasetEvaluator
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has no metadata.evaluator_type; set it to one of "
            f"{sorted(EVALUATOR_TYPES)}."
        )
    if evaluator_type not in EVALUATOR_TYPES:
        raise ValueError(
            f"Dataset '{dataset_name}' has evaluator_type '{evaluator_type}', which has no "
            f"evaluator; known types: {sorted(EVALUATOR_TYPES)}."
        )
    return EVALUATOR_TYPES[evaluator_type](dataset_name, output_dir=output_dir, **kwargs)
