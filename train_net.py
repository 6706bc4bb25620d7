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

import logging
import os

import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from grounding_dino.checkpoint import GroundingDINOCheckpointer, check_partial
from grounding_dino.model_zoo import get_config
from grounding_dino.engine import (
    build_hooks,
    build_trainer,
    evaluate,
    is_cpu_device,
    launch,
    wrap_ddp,
    write_eval_metrics,
)

logger = logging.getLogger("detectron2")


def do_test(cfg, model):
    """
    Runs ``dataloader.evaluator`` on ``dataloader.test`` without the display threshold
    (:func:`~grounding_dino.engine.evaluate`); prints and returns the results.
    """
    return evaluate(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))


def init_partial(cfg):
    """``train.init_partial``: False, True or a list of key prefixes (see the module doc)."""
    if "init_partial" not in cfg.train:
        raise KeyError(
            f"train.init_checkpoint={cfg.train.init_checkpoint} is loaded to start training but "
            "the config does not set train.init_partial: set it to False (the checkpoint must "
            "match the model), True (load what matches) or a list of key prefixes that may "
            'stay at the model\'s initialisation (e.g. ["neck.", "decoder."])'
        )
    return check_partial(cfg.train.init_partial)


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

    model = wrap_ddp(model, cfg.train.device, **cfg.train.ddp)
    trainer = build_trainer(cfg.train, model, train_loader, optimizer)
    checkpointer = GroundingDINOCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    # train.eval_period: evaluate every so many iterations and after the last (0: only after
    # the last; < 0: never).
    eval_period = cfg.train.eval_period
    if "evaluator" not in cfg.dataloader:
        logger.warning("The config has no dataloader.evaluator: training without evaluation")
    elif eval_period < 0:
        logger.info(f"train.eval_period={eval_period}: training without evaluation")
    run_eval = "evaluator" in cfg.dataloader and eval_period >= 0
    eval_function = (lambda: do_test(cfg, model)) if run_eval else None
    trainer.register_hooks(
        build_hooks(cfg.train, instantiate(cfg.lr_multiplier), checkpointer, eval_function)
    )

    resuming = args.resume and checkpointer.has_checkpoint()
    partial = init_partial(cfg) if cfg.train.init_checkpoint and not resuming else False
    checkpointer.resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume, partial=partial, convert_sources=True
    )
    if resuming:
        # The checkpoint holds the iteration it was saved after; continue with the next one.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def do_eval_only(args, cfg):
    """
    Evaluates ``train.init_checkpoint`` (with ``--resume``: the last checkpoint), which must
    match the model exactly; appends the results to ``train.output_dir/metrics.json`` at the
    checkpoint's iteration (0 for a checkpoint without one, e.g. a converted one).
    """
    if "evaluator" not in cfg.dataloader:
        raise KeyError("--eval-only: the config has no dataloader.evaluator to evaluate with")
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    # No DistributedDataParallel: inference needs no gradient synchronisation; each process
    # evaluates its shard of dataloader.test and the evaluator gathers the results.
    checkpointer = GroundingDINOCheckpointer(model, cfg.train.output_dir)
    extra = checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    results = do_test(cfg, model)
    if "iteration" in extra:
        iteration = int(extra["iteration"])
    else:
        iteration = 0
        logger.info("The checkpoint holds no iteration: metrics.json gets iteration 0")
    write_eval_metrics(results, cfg.train.output_dir, iteration)
    return results


def check_init_checkpoint(cfg, resume: bool, eval_only: bool = False) -> None:
    """
    Fails early (before any data is read) when ``train.init_checkpoint`` names a missing
    file that would be loaded: without ``--resume`` or when ``train.output_dir`` has no
    checkpoint to resume from; with ``--eval-only`` also when it is empty (the model's random
    initialisation would be evaluated).
    """
    if resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint")):
        return
    path = cfg.train.init_checkpoint
    if eval_only and not path:
        raise ValueError(
            "--eval-only with an empty train.init_checkpoint would evaluate the model's random "
            "initialisation; set train.init_checkpoint=PATH (or --resume with a checkpoint in "
            f"train.output_dir={cfg.train.output_dir})"
        )
    if path and "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"train.init_checkpoint={path} does not exist; convert an official checkpoint "
            'first (python -m grounding_dino.convert) or set train.init_checkpoint="" to '
            "start from the model's own initialisation"
        )


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
    if args.eval_only:
        return do_eval_only(args, cfg)
    do_train(args, cfg)


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
