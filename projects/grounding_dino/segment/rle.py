"""Masks <-> COCO run-length encoding (pycocotools), in the form JSON files carry."""

from typing import Dict, List

import numpy as np
import torch
from pycocotools import mask as mask_utils

__all__ = ["masks_to_rle", "rle_to_masks"]


def masks_to_rle(masks: torch.Tensor) -> List[Dict]:
    """
    Args:
        masks: (N, H, W) bool masks.

    Returns:
        N COCO RLEs ``{"size": [H, W], "counts": str}`` (compressed counts decoded to ``str``,
        so that ``json.dump`` takes them), as ``pycocotools.mask.encode`` writes them.
    """
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle needs (N, H, W) masks, got shape {tuple(masks.shape)}")
    # pycocotools wants Fortran-ordered (H, W, N) uint8.
    array = np.asfortranarray(masks.bool().cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(array) if len(masks) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def rle_to_masks(rles: List[Dict]) -> torch.Tensor:
    """
    Args:
        rles: COCO RLEs (``counts`` as ``str`` or ``bytes``), all of one image size.

    Returns:
        (N, H, W) bool masks; (0, 0, 0) for an empty list.

    Raises:
        ValueError: an RLE lacks ``size``/``counts``, or the sizes differ.
    """
    if not rles:
        return torch.zeros((0, 0, 0), dtype=torch.bool)
    for index, rle in enumerate(rles):
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"RLE {index} is not a COCO RLE with 'size' and 'counts': {rle!r}")
    sizes = {tuple(rle["size"]) for rle in rles}
    if len(sizes) != 1:
        raise ValueError(f"The RLEs have different image sizes: {sorted(sizes)}")
    encoded = [{"size": list(rle["size"]), "counts": _counts_bytes(rle["counts"])} for rle in rles]
    return torch.from_numpy(mask_utils.decode(encoded).transpose(2, 0, 1).astype(bool))


def _counts_bytes(counts):
    return counts.encode("ascii") if isinstance(counts, str) else counts
