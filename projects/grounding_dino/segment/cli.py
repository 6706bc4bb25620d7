"""The command lines' ``--sam DIR`` and ``--sam-batch-size N``: the optional mask stage."""

import argparse
from typing import Optional

from .stage import MaskStage

__all__ = ["add_sam_arguments", "mask_stage_from_args"]


def add_sam_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--sam DIR`` (default: no mask stage) and ``--sam-batch-size N`` (default 64)."""
    parser.add_argument(
        "--sam",
        metavar="DIR",
        default=None,
        help="a box-prompted segmenter folder (transformers SAM, SAM-HQ or SAM 2: config.json, "
        "model.safetensors, preprocessor_config.json) that turns every box into a mask; "
        "see docs/segmentation.md. Default: boxes only",
    )
    parser.add_argument(
        "--sam-batch-size",
        type=int,
        default=64,
        metavar="N",
        help="boxes per mask-decoder call of the --sam segmenter (default 64)",
    )


def mask_stage_from_args(args, *, device, dtype) -> Optional[MaskStage]:
    """
    The mask stage of parsed arguments: None without ``--sam`` (nothing is loaded).

    Args:
        args: parsed arguments with ``sam`` and ``sam_batch_size`` (:func:`add_sam_arguments`).
        device: where it runs (the detector's device).
        dtype: the precision mode (the detector's ``--dtype``).

    Raises:
        FileNotFoundError, ValueError: the folder is not a segmenter (as
            :meth:`MaskStage.from_pretrained`), or ``--sam-batch-size`` < 1.
    """
    if getattr(args, "sam", None) is None:
        return None
    return MaskStage.from_pretrained(
        args.sam, device=device, dtype=dtype, box_batch_size=args.sam_batch_size
    )
