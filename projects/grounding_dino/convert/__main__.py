"""Converts checkpoints of other code bases to this project's keys.

Usage::

    python -m grounding_dino.convert official groundingdino_swint_ogc.pth OUT_DIR
    python -m grounding_dino.convert official open_groundingdino/checkpoint0011.pth OUT_DIR
    python -m grounding_dino.convert hf path/to/grounding-dino-tiny OUT_DIR --tokenizer DIR
    python -m grounding_dino.convert hf path/to/mm_grounding_dino_tiny_o365v1_goldg OUT_DIR
    python -m grounding_dino.convert mmdet grounding_dino_swin-t_finetune_coco.pth OUT_DIR
    python -m grounding_dino.convert mmdet llmdet_swin_tiny.pth OUT_DIR  # MM-GDINO, LLMDet
    python -m grounding_dino.convert imagenet-swin swin_tiny_patch4_window7_224.pth OUT_DIR
    python -m grounding_dino.convert dino-official checkpoint0033_4scale_swin.pth OUT_DIR
    python -m grounding_dino.convert dino-detrex dino_swin_tiny_224_4scale_12ep.pth OUT_DIR
    python -m grounding_dino.convert auto ANY_OF_THE_ABOVE OUT_DIR
    python -m grounding_dino.convert to-hf CONFIG WEIGHTS OUT_DIR   # back to transformers

``hf`` reads ``model_type`` in config.json: ``grounding-dino`` (one head shared by the decoder
layers) or ``mm-grounding-dino`` (MM-Grounding-DINO, LLMDet: one head per layer); ``mmdet``
tells the two apart by whether the decoder layers' branches differ.

Full sources (official, hf, mmdet) write ``OUT_DIR/model.pth`` (``{"model": state_dict}``) and
``OUT_DIR/config.yaml`` (the lazy config of the matching model, ``train.init_checkpoint``
pointing at model.pth). Partial sources (imagenet-swin or swin, dino-official, dino-detrex) write
``OUT_DIR/model.pth`` for ``train.init_checkpoint``, holding the parts of the model they cover;
they are checked against ``--config`` (default: the Swin-T configs; R-50 for a ResNet DINO).
An existing output file is never replaced unless ``--force`` is given; every file is written
atomically (an interrupted conversion leaves the old file, or none).

``to-hf`` goes the other way: this project's config and weights (a fine-tuned model, say) ->
a transformers folder for ``AutoModelForZeroShotObjectDetection`` and ``AutoProcessor``
(``python -m grounding_dino.convert to-hf --help``).
"""

import argparse
import logging
import os
import sys

from .build import convert_checkpoint

logger = logging.getLogger("grounding_dino.convert")

SOURCES = [
    "official",
    "open-groundingdino",
    "hf",
    "mmdet",
    "imagenet-swin",
    "swin",
    "dino-official",
    "dino-detrex",
    "auto",
]
_ALIASES = {"open-groundingdino": "official", "swin": "imagenet-swin"}


def _print_partial(report) -> None:
    print(f"Wrote {report['path']} (partial checkpoint from {report['source']})")
    print("covers: " + ", ".join(report["covers"]))
    print("stays at its initialisation: " + ", ".join(report["not_covered"]))
    for key, reason in report["dropped"].items():
        print(f"  dropped: {key} ({reason})")
    for key in report["unused"]:
        print(f"  unused: {key} (no counterpart in the model of {report['config']})")


def _print_dropped(dropped, max_listed: int = 10) -> None:
    """One line per dropped key; a reason shared by more than ``max_listed`` keys (LLMDet's
    language-model branch has thousands) gets one line with the count and the key prefixes."""
    by_reason = {}
    for key, reason in dropped.items():
        if not reason.startswith("copy"):
            by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        if len(keys) <= max_listed:
            for key in keys:
                print(f"  dropped: {key} ({reason})")
            continue
        prefixes = sorted({key.split(".")[0] + ".*" for key in keys})
        print(f"  dropped: {len(keys)} keys under {', '.join(prefixes)} ({reason})")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["to-hf"]:
        from .to_hf import main as to_hf_main

        return to_hf_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", choices=SOURCES + ["to-hf"], help="checkpoint format (or to-hf: see above)"
    )
    parser.add_argument("src", help="checkpoint file, or a transformers model folder")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer hub name or local folder (default: bert-base-uncased)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="lazy config to start from / check against (default: chosen from the source)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="train.device in the saved config (auto: CUDA when available, else the CPU)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing output files (else an error)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_checkpoint(
            _ALIASES.get(args.source, args.source),
            args.src,
            args.out_dir,
            tokenizer=args.tokenizer,
            config=args.config,
            device=args.device,
            force=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for entry in report.get("skipped_entries", []):
        print(f"  not converted: top-level entry {entry!r} (training state)")
    for note in report.get("notes", []):
        print(f"note: {note}")
    if "covers" in report:
        _print_partial(report)
        return 0
    print(
        f"Wrote {os.path.join(args.out_dir, 'model.pth')} and "
        f"{os.path.join(args.out_dir, 'config.yaml')}"
    )
    print(
        f"missing keys: {len(report['missing'])}, unexpected keys: " f"{len(report['unexpected'])}"
    )
    for kind in ("missing", "unexpected"):
        for key in report[kind]:
            print(f"  {kind}: {key}")
    _print_dropped(report.get("dropped", {}))
    return 0 if not report["missing"] and not report["unexpected"] else 2


if __name__ == "__main__":
    sys.exit(main())
