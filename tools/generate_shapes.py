#!/usr/bin/env python
"""
Writes the synthetic shapes datasets ahead of time (``grounding_dino.data.synthetic``).

The datasets are otherwise drawn on first use (``DatasetCatalog.get``) and cached; this tool
draws them now and prints each registered split with its folder and record count. Example::

    python tools/generate_shapes.py --root output/demo/shapes --num-train 2000 --num-val 200
    python tools/generate_shapes.py --root /tmp/s --num-train 8 --num-val 4 --image-size 128
"""

import argparse
import logging
import sys
import time
from typing import Dict, Optional, Sequence

from detectron2.data import DatasetCatalog

from grounding_dino.data.synthetic import register_shapes_datasets


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=None,
        help="cache folder (default: $GROUNDING_DINO_SHAPES_DIR or " "output/demo/shapes)",
    )
    parser.add_argument("--num-train", type=int, default=2000, help="train images")
    parser.add_argument("--num-val", type=int, default=200, help="val and val_unseen images")
    parser.add_argument("--image-size", type=int, default=256, help="side of the images (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="shapes", help="dataset name prefix")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Draws every split; returns {dataset name: split folder}."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        registered = register_shapes_datasets(
            root=args.root,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            prefix=args.prefix,
            seed=args.seed,
        )
    except ValueError as error:  # bad generation parameters, named by ShapesConfig
        sys.exit(f"error: {error}")
    for name, folder in registered.items():
        print(f"{name}: {len(DatasetCatalog.get(name))} records in {folder}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return registered


if __name__ == "__main__":
    main()
