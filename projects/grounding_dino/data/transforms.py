"""Augmentations of the official Grounding DINO training, built from detectron2's transforms."""

from typing import List, Sequence, Tuple, Union

from detectron2.data import transforms as T
from fvcore.transforms.transform import HFlipTransform, Transform, TransformList

__all__ = [
    "RandomSelect",
    "build_train_augmentations",
    "build_test_augmentations",
    "count_hflips",
    "TRAIN_MIN_SIZES",
]

TRAIN_MIN_SIZES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


class RandomSelect(T.Augmentation):
    """
    Applies one of two augmentation sequences: the first with probability ``prob``, else the
    second (the official ``RandomSelect``).
    """

    def __init__(
        self,
        first: Sequence[Union[T.Augmentation, Transform]],
        second: Sequence[Union[T.Augmentation, Transform]],
        prob: float = 0.5,
    ):
        """
        Args:
            first: augmentations applied with probability ``prob``.
            second: augmentations applied otherwise.
            prob: probability of ``first``.
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomSelect prob must be in [0, 1], got {prob}")
        self.first = T.AugmentationList(list(first))
        self.second = T.AugmentationList(list(second))
        self.prob = prob

    def __call__(self, aug_input) -> TransformList:
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)

    def get_transform(self, *args):
        raise NotImplementedError("RandomSelect is applied with __call__(aug_input)")

    def __repr__(self):
        return f"RandomSelect(first={self.first}, second={self.second}, prob={self.prob})"

    __str__ = __repr__


def build_train_augmentations(
    min_sizes: Sequence[int] = TRAIN_MIN_SIZES,
    max_size: int = 1333,
    crop_size: Tuple[int, int] = (384, 600),
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    flip_prob: float = 0.5,
) -> List[T.Augmentation]:
    """
    The official training augmentation: horizontal flip, then with probability 1/2 a random
    shortest-edge resize, otherwise a resize to ``crop_resize_sizes``, a random crop with
    sides in ``crop_size`` and the random shortest-edge resize.

    Args:
        min_sizes: shortest-edge lengths to choose from (480..800 step 32).
        max_size: longest-edge limit (1333).
        crop_size: (min, max) side of the random crop in pixels (384, 600).
        crop_resize_sizes: shortest-edge lengths before the crop (400, 500, 600).
        flip_prob: probability of the horizontal flip (the mapper swaps "left"/"right").

    Returns:
        Augmentations for ``GroundingDatasetMapper``.
    """
    resize = T.ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice")
    crop = [
        T.ResizeShortestEdge(list(crop_resize_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        T.ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice"),
    ]
    return [T.RandomFlip(prob=flip_prob, horizontal=True), RandomSelect([resize], crop)]


def build_test_augmentations(min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    """Shortest edge ``min_size`` with the longest edge at most ``max_size``, rounded as the
    official inference resize (``OfficialResize``), so evaluation sees the predictor's pixels."""
    from ..resize import OfficialResize

    return [OfficialResize(min_size, max_size)]


def count_hflips(transforms: Union[Transform, TransformList]) -> int:
    """Number of horizontal flips in a (nested) transform list."""
    if isinstance(transforms, TransformList):
        return sum(count_hflips(t) for t in transforms.transforms)
    return int(isinstance(transforms, HFlipTransform))
