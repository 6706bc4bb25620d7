"""Converts official or Hugging Face Grounding DINO weights to a Detectron2 checkpoint.

Usage::

    python -m grounding_dino.convert official groundingdino_swint_ogc.pth OUT_DIR
    python -m grounding_dino.convert hf path/to/grounding-dino-tiny OUT_DIR --tokenizer DIR

Writes ``OUT_DIR/model.pth`` (``{"model": state_dict}``) and ``OUT_DIR/config.yaml`` (the
lazy config of the matching model, with ``train.init_checkpoint`` pointing at model.pth).
"""

import argparse
import logging
import os
import sys

from .build import convert_checkpoint

logger = logging.getLogger("grounding_dino.convert")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", choices=["official", "hf"], help="checkpoint format")
    parser.add_argument("src", help="official .pth file, or a transformers model folder")
    parser.add_argument("out_dir", help="output folder for model.pth and config.yaml")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer hub name or local folder (default: bert-base-uncased)",
    )
    parser.add_argument(
        "--config", default=None, help="lazy config to start from (default: chosen from the source)"
    )
    parser.add_argument("--device", default="cpu", help="train.device in the saved config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_checkpoint(
            args.source,
            args.src,
            args.out_dir,
            tokenizer=args.tokenizer,
            config=args.config,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    return 0 if not report["missing"] and not report["unexpected"] else 2


if __name__ == "__main__":
    sys.exit(main())
