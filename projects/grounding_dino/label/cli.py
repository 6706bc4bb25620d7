"""
``python -m grounding_dino.label``: label a folder of images with a class list, get a COCO
detection dataset.

Examples::

    python -m grounding_dino.label --config-file weights/swin_t/config.yaml \\
        --input photos/ --classes "person, bicycle, traffic light" --output labels.json

    # 8 GPUs, 4 images a forward; or --num-gpus 2 on a machine without GPUs: 2 CPU workers
    python -m grounding_dino.label --config-file C --weights W --input "photos/**/*.jpg" \\
        --classes-file names.txt --output labels.json --num-gpus 8 --batch-size 4

Run it again with the same ``--output`` after an interruption: the images already done are
skipped. Exit status: 0 when every image was labelled, 1 when some failed (listed in
``<output>.errors``), 2 for bad arguments.
"""

import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..engine.launch import launch
from ..model_zoo import add_model_arguments, load_config
from ..precision import check_precision
from .coco import coco_dataset, write_errors, write_json_atomic
from .inputs import expand_inputs, input_root, relative_name
from .model import config_digest, file_digest
from .parts import check_run, parts_dir, read_parts, repair_tails
from .progress import PartsProgress
from .worker import label_worker

__all__ = ["get_parser", "parse_classes", "main"]

logger = logging.getLogger(__name__)


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
    add("--output", required=True, metavar="JSON", help="the COCO dataset to write")
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
    add_model_arguments(
        parser,
        weights_help="checkpoint (default: the config's)",
        device_help="cuda or cpu (default: cuda when available)",
    )
    add("--num-gpus", type=int, default=1, help="worker processes per machine (CPU: gloo workers)")
    add("--num-machines", type=int, default=1)
    add("--machine-rank", type=int, default=0, help="this machine's rank, 0..num-machines-1")
    add("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines")
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
    for name in ("max_per_image", "batch_size", "num_gpus", "num_machines"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_workers < 0:
        raise ValueError("--decode-workers must be >= 0")
    if args.num_machines > 1 and args.dist_url == "auto":
        raise ValueError("--dist-url tcp://<machine 0>:<port> is needed with --num-machines > 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(f"--machine-rank {args.machine_rank} outside 0..{args.num_machines - 1}")


def _prepare(args, classes: List[str]) -> Dict:
    """Lists the inputs and checks the run (before any worker starts)."""
    _check_args(args)
    config = load_config(args.config_file, args.opts, args.weights)
    paths, errors = expand_inputs(args.input, recursive=True, list_files=True)
    if errors:
        raise FileNotFoundError("\n".join(errors))
    root = os.path.abspath(args.image_root) if args.image_root else input_root(args.input, paths)
    names = {}
    for path in paths:
        names.setdefault(relative_name(path, root), os.path.abspath(path))
    settings = {
        "classes": classes,
        "config_digest": config_digest(config.lazy),
        "weights_digest": file_digest(config.weights),
        "box_threshold": args.box_threshold,
        "nms": args.nms,
        "max_per_image": args.max_per_image,
        "dtype": args.dtype,
        "image_root": root,
    }
    return {"config": config, "names": names, "root": root, "run": settings}


def _merge(args, classes, names: Dict[str, str], run: Dict) -> int:
    """Writes the COCO file when every image is done; returns the exit status."""
    folder = parts_dir(args.output)
    labelled, failed = read_parts(folder)
    order = sorted(names)
    missing = [n for n in order if n not in labelled and n not in failed]
    if missing:
        print(
            f"{len(missing)} of {len(order)} images are not done yet (other machines may still "
            f"be at work); the last run to finish writes {args.output}. Run the same command "
            "again to finish an interrupted run."
        )
        return 0
    stale = len(set(labelled) - set(names))
    if stale:
        print(f"{stale} labelled images are no longer in --input: left out of {args.output}")
    info = {
        "description": "labels by python -m grounding_dino.label",
        "config_file": args.config_file,
        "weights": args.weights,
        **{k: v for k, v in run.items() if k != "classes"},
    }
    dataset = coco_dataset(order, labelled, classes, info)
    write_json_atomic(args.output, dataset)
    failures = [failed[n] for n in order if n in failed]
    write_errors(args.output + ".errors", failures)
    print(
        f"Wrote {args.output}: {len(dataset['images'])} images, "
        f"{len(dataset['annotations'])} boxes, {len(classes)} classes."
    )
    if failures:
        print(
            f"{len(failures)} images could not be labelled: see {args.output}.errors "
            "(they are tried again when the command is run again)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        classes = parse_classes(args.classes, args.classes_file)
        prepared = _prepare(args, classes)
        folder = parts_dir(args.output)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        resuming = check_run(args.output, prepared["run"])
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_precision(args.dtype, device)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        parser.error(str(error))
    names = prepared["names"]
    repair_tails(folder)
    labelled, failed = read_parts(folder)
    todo = [(names[n], n) for n in sorted(names) if n not in labelled]
    done = len(names) - len(todo)
    print(
        f"{len(names)} images under {prepared['root']}: {done} already labelled"
        + (f", {len(todo)} to do" if resuming else "")
        + f" ({args.num_gpus * args.num_machines} worker(s), {device})."
    )
    settings = {
        **prepared["run"],
        "parts_dir": folder,
        "config_file": args.config_file,
        "opts": list(args.opts),
        "weights": prepared["config"].weights,
        "device": device,
        "batch_size": args.batch_size,
        "decode_workers": args.decode_workers,
    }
    if todo:
        start = time.perf_counter()
        with PartsProgress(folder, total=len(names), initial=done):
            launch(
                label_worker,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(settings, todo),
                device=device,
            )
        seconds = time.perf_counter() - start
        print(
            f"Labelled {len(todo)} images in {seconds:.1f} s ({len(todo) / seconds:.2f} images/s)."
        )
    return _merge(args, classes, names, prepared["run"])
