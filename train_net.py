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
``optimizer.lr=2e-4``, ``train.max_iter=1000``...). A key that is neither in the config nor an
argument of its node's ``_target_`` is an error naming the closest known key
(``train.max_iterr=1`` -> "did you mean 'train.max_iter'?"); ``+key=value`` adds a new key on
purpose (:mod:`grounding_dino.config_overrides`). The files of every dataset of the run
(training and test) are checked before the first iteration. ``train.device=auto`` trains on
CUDA when it is available, else on the CPU. ``train.amp.enabled=auto`` (the default) is mixed
precision on CUDA (``train.amp.dtype``: fp16 by default, or bf16) and float32 on the CPU;
``train.amp.enabled=True`` on the CPU trains with bf16 autocast, refused on a CPU without
native bfloat16 (emulated, far slower than float32) unless ``--allow-emulated-bf16``.

A NaN or infinite loss stops training with a :class:`FloatingPointError` naming the iteration
and the losses; the weights are not updated with it, the periodic checkpoints are kept and the
last good state is saved as ``model_last_good.pth``.

Evaluation (every ``train.eval_period``, after the last iteration, and ``--eval-only``) does not
depend on the display knobs ``model.box_threshold`` / ``model.max_detections``: the model runs
without a score threshold and with at least 300 detections per image
(:func:`grounding_dino.engine.evaluate`). The results are printed and written to
``train.output_dir/metrics.json`` (``{"iteration": ..., "bbox/AP": ...}``).

``--sam DIR`` (a SAM / SAM-HQ / SAM 2 transformers folder, or the config's ``mask_stage`` node)
turns the 100 best boxes of each image into masks (``mask_eval_max_per_image``), and the COCO
evaluator reports ``segm`` AP beside ``bbox`` (docs/evaluation.md)::

    python train_net.py --config-file configs/shapes_tiny.py --eval-only --sam output/demo/sam \
        train.init_checkpoint=output/demo/model_final.pth

Checkpoints must match the model (same keys and shapes), else the run stops with an error
naming the keys: ``--eval-only`` and ``--resume`` always; ``train.init_checkpoint`` when
training too, unless ``train.init_partial`` is True or a list of key prefixes allowed to stay
at the model's initialisation (e.g. an ImageNet backbone); what a partial load skipped is
logged.
"""

from detectron2.config import LazyCall as L
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from grounding_dino.engine import (
    check_init_checkpoint,
    do_eval_only,
    do_train,
    launch_from_args,
    use_amp,
)
from grounding_dino.config_overrides import UnknownConfigKeyError
from grounding_dino.model_zoo import get_config, resolve_device
from grounding_dino.precision import add_allow_emulated_bf16_argument
from grounding_dino.segment import MaskStage
from grounding_dino.segment.cli import add_sam_arguments


def load_config(args):
    """``--config-file`` (a file or a packaged config's name) with the ``key=value`` overrides,
    checked."""
    try:
        cfg = get_config(args.config_file, args.opts)
    except UnknownConfigKeyError as error:
        raise SystemExit(f"train_net.py: {error}") from None
    for key in ("model", "train", "dataloader"):
        if key not in cfg:
            raise KeyError(f"{args.config_file} defines no '{key}'")
    try:
        # "auto": CUDA when available, else the CPU; a CUDA device without CUDA is refused.
        cfg.train.device = resolve_device(cfg.train.device)
        if not args.eval_only:
            use_amp(cfg.train)  # fp16 or emulated bf16 on the CPU is refused here
    except ValueError as error:
        raise SystemExit(f"train_net.py: {error}") from None
    if getattr(args, "sam", None):
        # The evaluation's mask stage (segm AP beside bbox); the config's own mask_stage
        # node otherwise (None or absent: boxes only).
        cfg.mask_stage = L(MaskStage.from_pretrained)(
            path=args.sam, box_batch_size=args.sam_batch_size
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
    return load_config(args).train.device


def argument_parser():
    """detectron2's ``default_argument_parser`` with ``--allow-emulated-bf16`` and the mask
    stage's ``--sam DIR`` / ``--sam-batch-size``."""
    parser = default_argument_parser()
    add_allow_emulated_bf16_argument(parser.add_argument)
    add_sam_arguments(parser)
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    # The whole config is checked (override keys, device, AMP) before any process starts.
    launch_from_args(main, args, (args,), launch_device(args))


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
