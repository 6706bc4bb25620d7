#!/usr/bin/env python
"""Grounding DINO in a browser: upload an image, type a prompt, see the boxes (and with
``--sam``, their masks) (Gradio).

Examples::

    # the offline demo model that `make demo` trains (weights: output/demo/model_final.pth)
    python demo/web.py --config-file output/demo/config.yaml

    # a converted checkpoint, reachable from other machines on the network
    python demo/web.py --config-file weights/swin_t/config.yaml \\
        --weights weights/swin_t/model.pth --port 7860 --share-host

    # Grounded-SAM: a "Masks" switch in the page (a transformers SAM / SAM-HQ / SAM 2 folder)
    python demo/web.py --config-file weights/swin_t/config.yaml \
        --weights weights/swin_t/model.pth --sam sam-vit-base/

Open http://127.0.0.1:7860. Programs call the same endpoint with ``gradio_client``; the last
input asks for masks (default False), the last output holds them as COCO RLEs, one per table
row (``pycocotools.mask.decode`` reads them)::

    from gradio_client import Client, handle_file
    image, table, status, masks = Client("http://127.0.0.1:7860/").predict(
        handle_file("cat.jpg"), "cat, remote control", 0.25, 0.25, False, 0.5, True,
        api_name="/detect")

Requests are queued (``--queue-size`` waiting at most) and the model runs one at a time. The
server runs offline: Gradio's analytics are off and no public share link is made
(``--share-host`` only listens on all network interfaces instead of 127.0.0.1).
"""

import argparse
import glob
import os
import sys

# Forced: the server runs offline even where the environment turns analytics on.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402

from grounding_dino import GroundingDINOPredictor  # noqa: E402
from grounding_dino.model_zoo import add_model_arguments, load_config  # noqa: E402
from grounding_dino.segment.cli import add_sam_arguments, mask_stage_from_args  # noqa: E402
from grounding_dino.web.app import Detector, build_app  # noqa: E402

DEMO_WEIGHTS = os.path.join("output", "demo", "model_final.pth")
DEMO_IMAGES = os.path.join("output", "demo", "shapes", "val-*", "images", "*.png")
DEMO_PROMPTS = [
    "green triangle, blue square, purple square",
    "red square . green triangle .",
    "blue square, red square",
]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--share-host",
        action="store_true",
        help="listen on all network interfaces (0.0.0.0) instead of 127.0.0.1 only",
    )
    parser.add_argument("--box-threshold", type=float, default=0.25, help="initial box threshold")
    parser.add_argument("--text-threshold", type=float, default=0.25, help="initial text threshold")
    parser.add_argument("--nms", type=float, default=0.5, help="initial class-wise NMS IoU")
    parser.add_argument(
        "--max-pixels",
        type=float,
        default=25e6,
        help="refuse images with more pixels than this (default 25e6)",
    )
    parser.add_argument(
        "--queue-size", type=int, default=32, help="requests waiting at most; more are refused"
    )
    add_model_arguments(
        parser,
        weights_help=f"checkpoint (default: the config's init_checkpoint / MODEL.WEIGHTS, else "
        f"{DEMO_WEIGHTS} from `make demo`)",
    )
    add_sam_arguments(parser)
    return parser


def demo_examples(count: int = 3):
    """(image, prompt) pairs: the first few validation images of `make demo`, if present."""
    paths = sorted(glob.glob(DEMO_IMAGES))[:count]
    return [(path, DEMO_PROMPTS[i % len(DEMO_PROMPTS)]) for i, path in enumerate(paths)]


def resolve_weights(args, parser):
    """--weights, else the config's, else the demo model; an error saying what to do."""
    config = load_config(args.config_file, args.opts, args.weights)
    if not config.weights:
        if not os.path.isfile(DEMO_WEIGHTS):
            parser.error(
                f"no weights: --weights is not given, the config names none, and the demo model "
                f"{DEMO_WEIGHTS} does not exist. Run `make demo` to train it (offline, on the "
                f"CPU), or pass --weights model.pth (e.g. a checkpoint converted with "
                f"python -m grounding_dino.convert)"
            )
        config.weights = DEMO_WEIGHTS
    return config


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    for name in ("box_threshold", "text_threshold", "nms"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in [0, 1]")
    if args.max_pixels <= 0 or args.queue_size < 1:
        parser.error("--max-pixels and --queue-size must be positive")
    if args.max_pixels > Image.MAX_IMAGE_PIXELS:
        parser.error(
            f"--max-pixels {args.max_pixels:.0f}: more than PIL's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels, which decoding keeps"
        )
    try:
        config = resolve_weights(args, parser)
        predictor = GroundingDINOPredictor.from_model_config(
            config, device=args.device, dtype=args.dtype
        )
        mask_stage = mask_stage_from_args(
            args, device=predictor.model.device, dtype=predictor.dtype
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        parser.error(str(error))
    detector = Detector(predictor=predictor, max_pixels=int(args.max_pixels), mask_stage=mask_stage)
    examples = demo_examples()
    if not examples:
        print(f"No example images ({DEMO_IMAGES} appears after `make demo`).", file=sys.stderr)
    title = f"Model: `{args.config_file}`, weights `{config.weights}`."
    if mask_stage is not None:
        title += f" Masks: `{args.sam}` ({mask_stage.kind})."
    app = build_app(
        detector,
        title=title,
        box_threshold=args.box_threshold,
        text_threshold=args.text_threshold,
        nms=args.nms,
        examples=examples,
    )
    app.queue(default_concurrency_limit=1, max_size=args.queue_size)
    host = "0.0.0.0" if args.share_host else "127.0.0.1"
    print(f"Grounding DINO web demo on http://{host}:{args.port}", flush=True)
    app.launch(
        server_name=host,
        server_port=args.port,
        share=False,
        show_error=True,
        max_file_size="50mb",
        ssr_mode=False,
        allowed_paths=sorted({os.path.dirname(os.path.abspath(p)) for p, _ in examples}),
    )
    return 0


if __name__ == "__main__":
    setup_logger(name="grounding_dino")
    torch.set_grad_enabled(False)
    sys.exit(main())
