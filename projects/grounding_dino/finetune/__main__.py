"""
Fine-tuning tools (docs/training.md, "Keep what the model knew")::

    # interpolate base and fine-tuned weights, evaluate each on the target and the retention
    # sets of the config (dataloader.retention), draw the trade-off curve
    python -m grounding_dino.finetune wise-ft CONFIG BASE.pth FINETUNED.pth --output DIR \\
        [--alphas 0,0.25,0.5,0.75,1] [--max-target-loss 1.0] [--metric bbox/AP50] [key=value...]

    # fold a LoRA run's adapter into plain weights (predictor, --eval-only, exports)
    python -m grounding_dino.finetune merge-lora CONFIG ADAPTER.pth OUT.pth [--base BASE.pth]

CONFIG is a lazy config (the run's ``config.yaml`` works); ``key=value`` are overrides. Files
are never overwritten.
"""

import argparse
import logging
import os
import sys

__all__ = ["main"]

logger = logging.getLogger("grounding_dino.finetune")


def _alphas(text: str):
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--alphas takes numbers like 0,0.5,1, got {text!r}"
        ) from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wise = commands.add_parser("wise-ft", help="weight-space ensembling and its trade-off curve")
    wise.add_argument("config", help="lazy config: the target test set and dataloader.retention")
    wise.add_argument("base", help="the checkpoint fine-tuning started from (alpha 0)")
    wise.add_argument("finetuned", help="the fine-tuned checkpoint (alpha 1)")
    wise.add_argument("--output", required=True, help="folder for the interpolations and plot")
    wise.add_argument(
        "--alphas",
        type=_alphas,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="comma-separated mixing weights in [0, 1] (default 0,0.25,0.5,0.75,1)",
    )
    wise.add_argument(
        "--max-target-loss",
        type=float,
        default=1.0,
        help="target points one accepts to lose against the fine-tuned model (default 1.0)",
    )
    wise.add_argument("--metric", default="bbox/AP50", help="result key (default bbox/AP50)")
    wise.add_argument("overrides", nargs="*", help="config overrides key=value")
    merge = commands.add_parser("merge-lora", help="fold a LoRA adapter into plain weights")
    merge.add_argument("config", help="lazy config of the model (the run's config.yaml)")
    merge.add_argument("adapter", help="adapter checkpoint of a train.lora run")
    merge.add_argument("out", help="the .pth file to write (must not exist)")
    merge.add_argument("--base", default=None, help="base weights (default: the run's record)")
    merge.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def _wise_ft(args) -> int:
    from ..model_zoo import get_config
    from .wise_ft import run_wise_ft

    cfg = get_config(args.config, args.overrides)
    summary = run_wise_ft(
        cfg,
        args.base,
        args.finetuned,
        args.alphas,
        args.output,
        metric=args.metric,
        max_target_loss=args.max_target_loss,
    )
    from .report import table

    print(table(summary))
    print(f"Wrote {len(summary['rows'])} interpolations, wise_ft.md/.json/.png to {args.output}")
    return 0


def _merge(args) -> int:
    from ..model_zoo import get_config
    from .merge import merge_adapter_checkpoint, save_new

    if os.path.exists(args.out):
        raise FileExistsError(f"{args.out} exists; nothing is overwritten")
    cfg = get_config(args.config, args.overrides)
    merged = merge_adapter_checkpoint(cfg, args.adapter, args.base)
    save_new(merged.state_dict(), args.out)
    print(f"Wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): plain weights")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    # Overrides may also follow the options (argparse stops filling a positional list there).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..checkpoint import CheckpointMismatchError

    try:
        return _wise_ft(args) if args.command == "wise-ft" else _merge(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
