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
"""

import logging
import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from grounding_dino.checkpoint import GroundingDINOCheckpointer
from grounding_dino.engine import build_hooks, build_trainer, is_cpu_device, launch, wrap_ddp

logger = logging.getLogger("detectron2")


def do_test(cfg, model):
    """Runs ``dataloader.evaluator`` on ``dataloader.test``; returns the results ({} if none)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg):
    """
    Builds the model, optimizer, data loader, trainer and hooks from ``cfg`` and trains from
    iteration 0, or with ``--resume`` from the last checkpoint of ``train.output_dir``.
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = wrap_ddp(model, cfg.train.device, **cfg.train.get("ddp", {}))
    trainer = build_trainer(cfg.train, model, train_loader, optimizer)
    checkpointer = GroundingDINOCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    # train.eval_period: evaluate every so many iterations and after the last (0: only after
    # the last; < 0: never).
    evaluate = "evaluator" in cfg.dataloader and cfg.train.get("eval_period", 0) >= 0
    eval_function = (lambda: do_test(cfg, model)) if evaluate else None
    trainer.register_hooks(
        build_hooks(cfg.train, instantiate(cfg.lr_multiplier), checkpointer, eval_function)
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint holds the iteration it was saved after; continue with the next one.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def do_eval_only(args, cfg):
    """Evaluates ``train.init_checkpoint`` (with ``--resume``: the last checkpoint)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = wrap_ddp(model, cfg.train.device, **cfg.train.get("ddp", {}))
    checkpointer = GroundingDINOCheckpointer(model, cfg.train.output_dir)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    return do_test(cfg, model)


def check_init_checkpoint(cfg, resume: bool) -> None:
    """
    Fails early (before any data is read) when ``train.init_checkpoint`` names a missing
    file that would be loaded: without ``--resume`` or when ``train.output_dir`` has no
    checkpoint to resume from.
    """
    if resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint")):
        return
    path = cfg.train.init_checkpoint
    if path and "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"train.init_checkpoint={path} does not exist; convert an official checkpoint "
            'first (python -m grounding_dino.convert) or set train.init_checkpoint="" to '
            "start from the model's own initialisation"
        )


def load_config(args):
    """``LazyConfig.load(--config-file)`` then the ``key=value`` overrides, checked."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    for key in ("model", "train", "dataloader"):
        if key not in cfg:
            raise KeyError(f"{args.config_file} defines no '{key}'")
    device = cfg.train.get("device", "cuda")
    if not is_cpu_device(device) and not torch.cuda.is_available():
        raise SystemExit(
            f"train.device={device} but CUDA is not available here; add train.device=cpu"
        )
    return cfg


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    check_init_checkpoint(cfg, args.resume)
    if args.eval_only:
        return do_eval_only(args, cfg)
    do_train(args, cfg)


def launch_device(args) -> str:
    """``train.device`` of the job: from the overrides when given, else from the config."""
    for opt in reversed(args.opts):
        if opt.startswith("train.device="):
            return opt.split("=", 1)[1].strip("'\"")
    return load_config(args).train.get("device", "cuda")


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    device = launch_device(args)
    if not is_cpu_device(device) and not torch.cuda.is_available():
        raise SystemExit(
            f"train.device={device} but CUDA is not available here; add train.device=cpu"
        )
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
