"""``python -m grounding_dino.export onnx CONFIG OUT.onnx``: the command line of the exporter."""

import argparse
import logging
import os
import sys

from ..io.atomic import publish, temporary_path

__all__ = ["main", "load_model_for_export"]

logger = logging.getLogger("grounding_dino.export")

USAGE = """Exports a Grounding DINO to ONNX (the network between preprocessing and post-processing).

Usage::

    python -m grounding_dino.export onnx CONFIG OUT.onnx [--weights W] [--opset N] [--force]
        [key=value ...]

CONFIG is a lazy config (.py or .yaml, e.g. the converter's config.yaml); the weights are
``--weights`` or the config's ``train.init_checkpoint``, loaded strictly (every key and shape
must match the model). ``--random-weights`` exports the random initialisation instead (for
tests and size/speed measurements only). The graph takes any image size and any caption
length up to max_text_len; run it with ``grounding_dino.deploy.OnnxPredictor``.
"""


def load_model_for_export(config: str, weights=None, overrides=(), random_weights=False):
    """
    The model of a lazy config on the CPU in eval mode, with its weights loaded strictly.

    Args:
        config: lazy config file (.py or .yaml).
        weights: checkpoint; None: the config's ``train.init_checkpoint``.
        overrides: ``key=value`` config overrides.
        random_weights: keep the random initialisation (``weights`` must then be None).

    Returns:
        (model, cfg).

    Raises:
        FileNotFoundError: the config or the weights file does not exist.
        ValueError: no weights and no ``random_weights``, or both.
    """
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    from ..model_zoo import build_model, get_config

    if not os.path.isfile(config):
        raise FileNotFoundError(f"config file {config} does not exist")
    cfg = get_config(config, overrides)
    if random_weights:
        if weights:
            raise ValueError("--random-weights and --weights exclude each other")
    else:
        if weights is None:
            weights = OmegaConf.select(cfg, "train.init_checkpoint", default=None)
        if not weights:
            raise ValueError(
                f"no weights: pass --weights or set train.init_checkpoint in {config} (a "
                f"randomly initialised export needs --random-weights)"
            )
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights} does not exist")
    logger.info("Building the model of %s", config)
    if random_weights:
        logger.warning("Exporting the RANDOM initialisation (--random-weights): not for use")
        return instantiate(cfg.model).eval(), cfg
    logger.info("Loading %s", weights)
    return build_model(cfg, weights, device="cpu"), cfg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.export",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="ONNX (run with onnxruntime)")
    onnx.add_argument("config", help="lazy config (.py/.yaml)")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--weights", default=None, help="checkpoint (default: train.init_checkpoint)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    onnx.add_argument("--force", action="store_true", help="replace an existing OUT")
    onnx.add_argument(
        "--random-weights", action="store_true", help="export the random initialisation (tests)"
    )
    onnx.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .graph import DEFAULT_OPSET, export_onnx, write_metadata

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        if os.path.exists(args.out) and not args.force:
            raise FileExistsError(f"{args.out} exists; pass --force to replace it")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"the folder of {args.out} does not exist")
        model, _ = load_model_for_export(
            args.config, args.weights, args.overrides, args.random_weights
        )
        logger.info("Tracing and writing ONNX (opset %d); this takes a while", opset)
        # Written next to OUT and renamed at the end (with a new file's mode): a failed export
        # leaves no partial file, and a file that appeared meanwhile is not replaced.
        partial = temporary_path(args.out, ".onnx.partial")
        try:
            info = export_onnx(model, partial, opset=opset)
            write_metadata(partial, model, opset)
            publish(partial, args.out, replace=args.force)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, opset {opset}, "
        f"{info['seconds']:.1f} s)"
    )
    print("Inputs: image [1,3,H,W], input_ids/token_mask/position_ids [R,L], ")
    print("        self_attention_mask [R,L,L]; outputs: logits [R,Q,max_text_len], boxes [R,Q,4]")
    return 0
