"""
A labelling run: what it labels and with which settings (checked before any worker starts),
its workers over the images still to do, and the dataset made of their part files: a COCO file,
or a YOLO dataset (:mod:`~grounding_dino.label.yolo`).
"""

import os
import sys
import time
from datetime import timedelta
from typing import Dict, List

import torch

from ..engine.launch import launch_from_args
from ..io.coco_files import coco_dataset, write_errors, write_json_atomic
from ..io.inputs import expand_inputs, input_root, relative_name
from ..io.parts import PartsState, check_run, parts_dir, read_parts, repair_tails
from ..io.progress import PartsProgress
from ..model_zoo import load_config
from ..precision import check_precision
from ..segment.loading import read_segmenter_kind
from .digests import config_digest, file_digest, folder_digest
from .worker import label_worker
from .yolo import check_yolo_names, write_yolo_dataset

__all__ = ["prepare_run", "run_labelling"]


def prepare_run(args, classes: List[str]) -> Dict:
    """
    Lists the inputs, loads the config and checks the run against an earlier one of the same
    ``--output`` (before any worker starts).

    Args:
        args: the parsed command line (:func:`grounding_dino.label.cli.get_parser`).
        classes: the class list.

    Returns:
        ``{"config": ModelConfig, "names": {file name under the root: absolute path}, "root",
        "run": the settings that decide the labels (run.json), "resuming", "device"}``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError, KeyError: with a message for the user.
    """
    config = load_config(args.config_file, args.opts, args.weights)
    paths, errors = expand_inputs(args.input, recursive=True, list_files=True)
    if errors:
        raise FileNotFoundError("\n".join(errors))
    root = os.path.abspath(args.image_root) if args.image_root else input_root(args.input, paths)
    names = {}
    for path in paths:
        names.setdefault(relative_name(path, root), os.path.abspath(path))
    run = {
        "classes": classes,
        "config_digest": config_digest(config.lazy),
        "weights_digest": file_digest(config.weights),
        "box_threshold": args.box_threshold,
        "nms": args.nms,
        "max_per_image": args.max_per_image,
        "dtype": args.dtype,
        "image_root": root,
    }
    # Keys only when used, so that a run made before they existed still resumes.
    if args.sam:
        kind = read_segmenter_kind(args.sam)  # a wrong folder is named before any worker starts
        run["segmenter"] = {"kind": kind.name, "digest": folder_digest(args.sam)}
    if args.format != "coco":
        check_yolo_names(names)
        run["format"] = args.format
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    resuming = check_run(args.output, run)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_precision(args.dtype, device)
    return {
        "config": config,
        "names": names,
        "root": root,
        "run": run,
        "resuming": resuming,
        "device": device,
    }


def run_labelling(args, prepared: Dict) -> int:
    """
    Labels the images no part file holds yet, on ``--num-gpus`` workers of this machine, then
    writes the COCO file when every image of the run is done.

    Args:
        args: the parsed command line.
        prepared: :func:`prepare_run`'s result.

    Returns:
        the exit status: 0 when every image was labelled, 1 when some failed.
    """
    folder = parts_dir(args.output)
    names, device = prepared["names"], prepared["device"]
    repair_tails(folder)
    state = read_parts(folder)
    skipped = _skipped(state, args.max_attempts)
    todo = [(names[n], n) for n in sorted(names) if n not in state.labelled and n not in skipped]
    done = len(names) - len(todo)
    print(
        f"{len(names)} images under {prepared['root']}: {len(state.labelled)} already labelled"
        + (f", {len(skipped)} skipped after {args.max_attempts} failed attempts" if skipped else "")
        + (f", {len(todo)} to do" if prepared["resuming"] else "")
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
        "max_pixels": args.max_pixels,
        "sam": os.path.abspath(args.sam) if args.sam else None,
        "sam_batch_size": args.sam_batch_size,
        "main_pid": os.getpid(),
    }
    if todo:
        start = time.perf_counter()
        with PartsProgress(folder, total=len(names), initial=done, desc="labelling"):
            try:
                # The workers never communicate: gloo processes also on GPUs (each worker
                # takes the GPU of its local rank), which lets missing machines be named.
                launch_from_args(
                    label_worker,
                    args,
                    (settings, todo),
                    "cpu",
                    join_timeout=timedelta(seconds=args.peer_timeout),
                )
            except Exception as error:
                print(
                    f"Labelling stopped: {error}\nWhat was labelled is kept in {folder}; run "
                    "the same command again to go on.",
                    file=sys.stderr,
                )
                return 1
        seconds = time.perf_counter() - start
        print(
            f"Labelled {len(todo)} images in {seconds:.1f} s ({len(todo) / seconds:.2f} images/s)."
        )
    return _merge(args, names, prepared["run"])


def _skipped(state: PartsState, max_attempts: int) -> Dict[str, Dict]:
    """The images not labelled after ``max_attempts`` attempts: ``{name: {"path", "error"}}``
    (never tried again by this ``--max-attempts``)."""
    skipped = {}
    for name, record in state.failed.items():
        if record["attempts"] >= max_attempts:
            reason = f"skipped after {record['attempts']} failed attempts; the last: "
            skipped[name] = {"path": record["path"], "error": reason + record["error"]}
    for name, record in state.unfinished.items():
        if record["attempts"] >= max_attempts:
            reason = (
                f"skipped after {record['attempts']} attempts: the labeller died each time "
                "while this image was in its batch (killed? out of memory?)"
            )
            skipped[name] = {"path": record["path"], "error": reason}
    return skipped


def _merge(args, names: Dict[str, str], run: Dict) -> int:
    """Writes the dataset (COCO file or YOLO folder) when every image is done; returns the exit
    status."""
    classes = run["classes"]
    state = read_parts(parts_dir(args.output))
    labelled, skipped = state.labelled, _skipped(state, args.max_attempts)
    failed = {**state.failed, **skipped}
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
    if run.get("format", "coco") == "coco":
        write_json_atomic(args.output, dataset)
    else:
        write_yolo_dataset(args.output, dataset, names, segmentation="segmenter" in run)
    failures = [failed[n] for n in order if n in failed]
    write_errors(args.output + ".errors", failures)
    retried = [n for n in order if n in failed and n not in skipped]
    things = "masks" if "segmenter" in run else "boxes"
    print(
        f"Wrote {args.output}: {len(dataset['images'])} images, "
        f"{len(dataset['annotations'])} {things}, {len(classes)} classes"
        + (" (YOLO: images/, labels/, data.yaml)." if "format" in run else ".")
    )
    if retried:
        print(
            f"{len(retried)} images could not be labelled: see {args.output}.errors (they are "
            f"tried again when the command is run again, up to --max-attempts "
            f"{args.max_attempts} times)",
            file=sys.stderr,
        )
    if len(failures) > len(retried):
        print(
            f"{len(failures) - len(retried)} images were skipped after {args.max_attempts} "
            f"failed attempts: see {args.output}.errors (a larger --max-attempts tries them "
            "again)",
            file=sys.stderr,
        )
    return 1 if failures else 0
