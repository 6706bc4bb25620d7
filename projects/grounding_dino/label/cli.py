"""
``python -m grounding_dino.label``: label a folder of images with a class list, get a COCO
detection dataset (with ``--sam``, instance segmentation), or a YOLO dataset to train on.

Examples::

    python -m grounding_dino.label --config-file weights/swin_t/config.yaml \\
        --input photos/ --classes "person, bicycle, traffic light" --output labels.json

    # 8 GPUs, 4 images a forward; or --num-gpus 2 on a machine without GPUs: 2 CPU workers
    python -m grounding_dino.label --config-file C --weights W --input "photos/**/*.jpg" \\
        --classes-file names.txt --output labels.json --num-gpus 8 --batch-size 4

    # masks too (Grounded-SAM): COCO "segmentation" as RLE, "area" from the mask
    python -m grounding_dino.label ... --sam sam-vit-base/ --output labels.json

    # a YOLO dataset (segmentation with --sam), then `yolo train data=yolo_data/data.yaml`
    python -m grounding_dino.label ... --format yolo --output yolo_data/

Run it again with the same ``--output`` after an interruption (also a ``kill -9``): the images
already done are skipped. An image that fails is reported and tried again by the next run, up
to ``--max-attempts`` times; then it is skipped. Exit status: 0 when every image was labelled,
1 when some failed or were skipped (listed in ``<output>.errors``) or the run stopped, 2 for
bad arguments.
"""

import argparse
import os
from typing import List, Optional, Sequence

from ..io.images import DEFAULT_MAX_PIXELS
from ..model_zoo import add_model_arguments
from ..segment.cli import add_sam_arguments
from .run import prepare_run, run_labelling

__all__ = ["get_parser", "parse_classes", "main"]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--input",
        nargs="+",
        required=True,
        help="folders (with subfolders), globs (quote them; ** for subfolders), image files, "
        "or .txt files listing one image a line",
    )
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help='class names separated by commas: "person, bicycle"')
    classes.add_argument("--classes-file", metavar="FILE", help="class names, one a line")
    add(
        "--output",
        required=True,
        metavar="PATH",
        help="the COCO dataset (.json) to write; with --format yolo, the dataset's folder",
    )
    add(
        "--format",
        choices=["coco", "yolo"],
        default="coco",
        help="coco: one COCO json; yolo: a YOLO folder (images/, labels/, data.yaml) written by "
        "supervision, with polygons from the masks when --sam is given (default: coco)",
    )
    add(
        "--image-root",
        default=None,
        help="folder file names are relative to (default: the inputs')",
    )
    add("--box-threshold", type=float, default=0.35, help="keep boxes scoring above this")
    add("--nms", type=float, default=0.5, help="class-wise NMS IoU threshold; 0 turns it off")
    add("--max-per-image", type=int, default=100, help="at most this many boxes per image")
    add("--batch-size", type=int, default=1, help="images per forward of each worker")
    add("--decode-workers", type=int, default=2, help="image-decoding processes per worker")
    add(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="images with more pixels (width x height, read from the file's header) are "
        "reported and not decoded (default: %(default)s)",
    )
    add(
        "--max-attempts",
        type=int,
        default=3,
        help="an image that failed (or was in the batch of a worker that died) this many "
        "times is skipped by later runs (default: %(default)s)",
    )
    add_model_arguments(
        parser,
        weights_help="checkpoint (default: the config's)",
        device_help="cuda or cpu (default: cuda when available)",
    )
    add_sam_arguments(parser)
    add("--num-gpus", type=int, default=1, help="worker processes per machine (CPU: gloo workers)")
    add("--num-machines", type=int, default=1)
    add("--machine-rank", type=int, default=0, help="this machine's rank, 0..num-machines-1")
    add("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines")
    add(
        "--peer-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="with several machines: how long to wait for the others to start before stopping "
        "with the missing ranks named (default: %(default)s)",
    )
    return parser


def parse_classes(text: Optional[str], path: Optional[str]) -> List[str]:
    """The class list of ``--classes`` (commas) or ``--classes-file`` (one a line)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--classes-file {path}: no such file")
        with open(path) as f:
            names = [line.strip() for line in f]
        names, source = [n for n in names if n], f"--classes-file {path}"
    else:
        names, source = [n.strip() for n in text.split(",")], "--classes"
        if any(not n for n in names):
            raise ValueError(f"--classes {text!r} has an empty class name (two commas?)")
    if not names:
        raise ValueError(f"{source} holds no class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source} names {', '.join(repeated)} more than once")
    return names


def _check_args(args) -> None:
    if not 0 <= args.nms <= 1:
        raise ValueError(f"--nms {args.nms}: an IoU threshold in [0, 1] (0: no NMS)")
    for name in (
        "max_per_image",
        "batch_size",
        "num_gpus",
        "num_machines",
        "max_attempts",
        "sam_batch_size",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_workers < 0:
        raise ValueError("--decode-workers must be >= 0")
    if args.max_pixels < 1 or args.peer_timeout <= 0:
        raise ValueError("--max-pixels and --peer-timeout must be positive")
    if args.num_machines > 1 and args.dist_url == "auto":
        raise ValueError("--dist-url tcp://<machine 0>:<port> is needed with --num-machines > 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(f"--machine-rank {args.machine_rank} outside 0..{args.num_machines - 1}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        classes = parse_classes(args.classes, args.classes_file)
        _check_args(args)
        prepared = prepare_run(args, classes)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        parser.error(str(error))
    return run_labelling(args, prepared)
