#!/usr/bin/env python
"""
Trains and evaluates Grounding DINO with a LazyConfig, as detectron2's
``tools/lazyconfig_train_net.py``.

Examples::

    # fine-tune on COCO with 8 GPUs (NCCL, AMP)
    python train_net.py --config-file configs/finetune_coco_swin_t.py --num-gpus 8

    # two CPU processes (gloo), a few iterations, overrides after the flags
    python train_net.py --config-file configs/finetune_coco_swin_t.py --num-gpus 2 \\
        train.device=cpu train.max_iter=10 dataloader.train.total_batch_size=2

    # resume the last checkpoint of train.output_dir (iteration, optimizer, LR schedule)
    python train_net.py --config-file configs/finetune_coco_swin_t.py --resume

    # evaluate train.init_checkpoint (or, with --resume, the last checkpoint)
    python train_net.py --config-file configs/finetune_coco_swin_t.py --eval-only \\
        train.init_checkpoint=output/converted/swint_ogc/model.pth

Every ``key=value`` after the flags is a config override (``model.query_selector.num_queries=300``,
``optimizer.lr=2e-4``, ``train.max_iter=1000``...). A NaN or infinite loss stops training
with a :class:`FloatingPointError` naming the iteration and the losses; the weights are not
updated with it, the periodic checkpoints are kept and the last good state is saved as
``model_last_good.pth``.

Evaluation (every ``train.eval_period``, after the last iteration, and ``--eval-only``) does not
depend on the display knobs ``model.box_threshold`` / ``model.max_detections``: the model runs
without a score threshold and with at least 300 detections per image
(:func:`grounding_dino.engine.evaluate`). The results are printed and written to
``train.output_dir/metrics.json`` (``{"iteration": ..., "bbox/AP": ...}``).

Checkpoints must match the model (same keys and shapes), else the run stops with an error
naming the keys: ``--eval-only`` and ``--resume`` always; ``train.init_checkpoint`` when
training too, unless ``train.init_partial`` is True or a list of key prefixes allowed to stay
at the model's initialisation (e.g. an ImageNet backbone); what a partial load skipped is
logged.
"""

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from grounding_dino.engine import (
    check_init_checkpoint,
    do_eval_only,
    do_train,
    is_cpu_device,
    launch_from_args,
)
from grounding_dino.model_zoo import get_config


def load_config(args):
    """``--config-file`` (a file or a packaged config's name) with the ``key=value`` overrides,
    checked."""
    cfg = get_config(args.config_file, args.opts)
    for key in ("model", "train", "dataloader"):
        if key not in cfg:
            raise KeyError(f"{args.config_file} defines no '{key}'")
    device = cfg.train.device
    if not is_cpu_device(device) and not torch.cuda.is_available():
        raise SystemExit(
            f"train.device={device} but CUDA is not available here; add train.device=cpu"
        )
    return cfg


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    # The package's own messages (checkpoint checks, evaluation) go to the console and log.txt;
    # they still propagate to the root logger (pytest's caplog, an application's handlers).
    setup_logger(
        cfg.train.output_dir, distributed_rank=comm.get_rank(), name="grounding_dino"
    ).propagate = True
    check_init_checkpoint(cfg, args.resume, args.eval_only)
    # The driver (grounding_dino.engine.driver) is shared with the demo job.
    if args.eval_only:
        return do_eval_only(cfg, resume=args.resume)
    do_train(cfg, resume=args.resume)


def launch_device(args) -> str:
    """``train.device`` of the job: from the overrides when given, else from the config."""
    for opt in reversed(args.opts):
        if opt.startswith("train.device="):
            return opt.split("=", 1)[1].strip("'\"")
    return load_config(args).train.device


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    device = launch_device(args)
    if not is_cpu_device(device) and not torch.cuda.is_available():
        raise SystemExit(
            f"train.device={device} but CUDA is not available here; add train.device=cpu"
        )
    launch_from_args(main, args, (args,), device)


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
