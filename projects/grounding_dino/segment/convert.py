"""Converts the original SAM / SAM 2 checkpoints to transformers folders for ``--sam DIR``.

Usage::

    python -m grounding_dino.segment.convert sam sam_vit_h_4b8939.pth checkpoints/sam-vit-h
    python -m grounding_dino.segment.convert sam2 sam2.1_hiera_large.pt checkpoints/sam2.1-hiera-l

The variant (``vit_b``, ``vit_l``, ``vit_h``; ``hiera_t``, ``hiera_s``, ``hiera_b+``,
``hiera_l``) is read from the weights' shapes; ``--variant`` names it (and is checked), and
``--config CONFIG.json`` gives a transformers config.json for other sizes. The output folder
holds config.json, model.safetensors and preprocessor_config.json (the processor of the
model's input size: 1024 px for the released models), loadable by ``SamModel`` /
``Sam2Model.from_pretrained`` and by the mask stage. SAM 2's video modules (memory attention
and encoder, object pointers) are not part of the image segmenter: they are dropped and counted.
A SAM file's ``pixel_mean`` / ``pixel_std`` (input normalization, which transformers keeps in
the processor) become the processor's ``image_mean`` / ``image_std``; the command says so.

Every key must find its place: a file with keys the mapping does not know, or without keys the
model needs, is refused, naming them. Files are read with ``torch.load(weights_only=True)``;
existing output files are not replaced unless ``--force`` is given.
"""

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Optional

from ..convert.checkpoint import load_checkpoint_file
from ..io.atomic import publish, refuse_existing, temporary_directory
from . import convert_keys
from .loading import key_names, load_segmenter

__all__ = ["SAM_VARIANTS", "SAM2_VARIANTS", "convert_segmenter", "main"]

SAM_VARIANTS: Dict[str, Dict] = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                  global_attn_indexes=[7, 15, 23, 31]),
}  # fmt: skip
"""``SamVisionConfig`` arguments of the released SAM image encoders (segment_anything's
``build_sam_vit_*``); the rest are transformers' defaults (1024 px, patch 16, window 14)."""

SAM2_VARIANTS: Dict[str, Dict] = {
    "hiera_t": dict(hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 7, 2],
                    global_attention_blocks=[5, 7, 9], window_size_per_stage=[8, 4, 14, 7],
                    window_positional_embedding_background_size=[7, 7]),
    "hiera_s": dict(hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 11, 2],
                    global_attention_blocks=[7, 10, 13], window_size_per_stage=[8, 4, 14, 7],
                    window_positional_embedding_background_size=[7, 7]),
    "hiera_b+": dict(hidden_size=112, num_attention_heads=2, blocks_per_stage=[2, 3, 16, 3],
                     global_attention_blocks=[12, 16, 20], window_size_per_stage=[8, 4, 14, 7],
                     window_positional_embedding_background_size=[14, 14]),
    "hiera_l": dict(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
                    global_attention_blocks=[23, 33, 43], window_size_per_stage=[8, 4, 16, 8],
                    window_positional_embedding_background_size=[7, 7]),
}  # fmt: skip
"""``Sam2HieraDetConfig`` arguments of the released SAM 2 / 2.1 Hiera trunks (the official
``sam2.1_hiera_*.yaml``); stage widths and heads double at each stage."""


def _state_dict_of(data: Dict, path: str) -> Dict:
    state = data.get("model", data) if isinstance(data.get("model"), dict) else data
    if not state or not all(hasattr(value, "shape") for value in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (nor one under 'model')")
    return state


def _split_normalization(state: Dict, path: str):
    """
    Takes segment_anything's ``pixel_mean`` / ``pixel_std`` out of a SAM state dict.

    Returns:
        ``(state without them, {"image_mean": [3 floats], "image_std": [3 floats]} for 0..1
        pixels, or {} when the file has neither)``.
    """
    names = convert_keys.SAM_NORMALIZATION_KEYS
    found = [name for name in names if name in state]
    if not found:
        return state, {}
    if len(found) != len(names):
        raise ValueError(f"{path} has {found[0]} without {set(names) - set(found)}")
    wrong = {name: tuple(state[name].shape) for name in names if state[name].numel() != 3}
    if wrong:
        raise ValueError(f"{path}: {wrong} should hold 3 values (one per RGB channel)")
    rest = {key: value for key, value in state.items() if key not in names}
    values = [[float(v) / 255.0 for v in state[name].flatten()] for name in names]
    return rest, dict(zip(("image_mean", "image_std"), values))


def _processor_normalization(normalization: Dict) -> Dict:
    """The processor arguments for a file's normalization: none when it is the processor's own
    (ImageNet's, which the released SAM uses), so that the default stays bit-identical."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    default = {"image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}
    same = all(
        abs(a - b) < 1e-6
        for name in normalization
        for a, b in zip(normalization[name], default[name])
    )
    return {} if same else normalization


def _sam_config(state: Dict, variant: Optional[str]):
    from transformers import SamConfig, SamVisionConfig

    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    found = next((name for name, v in SAM_VARIANTS.items() if v["hidden_size"] == width), None)
    variant = _checked_variant(variant, found, f"an image encoder of width {width}", SAM_VARIANTS)
    vision = SamVisionConfig(**SAM_VARIANTS[variant])
    return SamConfig(vision_config=vision.to_dict()), variant


def _sam2_config(state: Dict, variant: Optional[str]):
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    blocks = 1 + max(
        int(key.split(".")[3]) for key in state if key.startswith("image_encoder.trunk.blocks.")
    )
    found = next(
        (
            name
            for name, v in SAM2_VARIANTS.items()
            if v["hidden_size"] == width and sum(v["blocks_per_stage"]) == blocks
        ),
        None,
    )
    what = f"a Hiera trunk of width {width} with {blocks} blocks"
    variant = _checked_variant(variant, found, what, SAM2_VARIANTS)
    spec = dict(SAM2_VARIANTS[variant])
    dims = [spec["hidden_size"] << stage for stage in range(4)]
    spec["embed_dim_per_stage"] = dims
    spec["num_attention_heads_per_stage"] = [spec["num_attention_heads"] << s for s in range(4)]
    backbone = Sam2HieraDetConfig(**spec)
    vision = Sam2VisionConfig(backbone_config=backbone.to_dict(), backbone_channel_list=dims[::-1])
    return Sam2Config(vision_config=vision.to_dict()), variant


def _checked_variant(asked: Optional[str], found: Optional[str], what: str, table) -> str:
    if asked is not None and asked not in table:
        raise ValueError(f"--variant {asked!r} is not one of {sorted(table)}")
    if found is None:
        raise ValueError(
            f"The checkpoint has {what}, which is none of {sorted(table)}; give its transformers "
            f"config.json with --config"
        )
    if asked is not None and asked != found:
        raise ValueError(f"--variant {asked} was asked, but the checkpoint has {what} ({found})")
    return found


def _processor(kind: str, image_size: int, normalization: Optional[Dict] = None):
    """The processor of an input size (the released models': 1024 px, transformers' defaults),
    with ``{"image_mean", "image_std"}`` when they differ from its own (SAM only)."""
    if kind == "sam2":
        from transformers import Sam2ImageProcessorFast, Sam2Processor

        square = {"height": image_size, "width": image_size}
        mask = {"height": image_size // 4, "width": image_size // 4}
        return Sam2Processor(
            Sam2ImageProcessorFast(size=square, mask_size=mask), target_size=image_size
        )
    from transformers import SamImageProcessor, SamProcessor

    return SamProcessor(
        SamImageProcessor(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": image_size // 4},
            mask_pad_size={"height": image_size // 4, "width": image_size // 4},
            **(normalization or {}),
        )
    )


def _config_from_file(path: str, kind: str):
    from transformers import AutoConfig

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path} does not exist")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != kind:
        raise ValueError(f"--config {path} is a {config.model_type!r} config, not {kind!r}")
    return config


def _renamed_state(kind: str, state: Dict, src: str):
    """
    An original SAM / SAM 2 state dict (without ``pixel_mean`` / ``pixel_std``) under
    transformers' names.

    Returns:
        ``(renamed, dropped video keys, {new key: original key})``; ``renamed`` also holds
        transformers' tied copy of the positional embedding.

    Raises:
        ValueError: keys of no ``kind`` layout, named.
    """
    rename, dropped_prefixes = {
        "sam": (convert_keys.sam_key, ()),
        "sam2": (convert_keys.sam2_key, convert_keys.SAM2_VIDEO_PREFIXES),
    }[kind]
    if kind == "sam2":
        state = convert_keys.stack_sam2_point_embeddings(state)
    renamed, unknown, dropped, origins = convert_keys.rename_state_dict(
        state, rename, dropped_prefixes
    )
    if unknown:
        raise ValueError(
            f"{src}: {len(unknown)} keys of no {kind} layout: {key_names(unknown, 10)}"
        )
    if "shared_image_embedding.positional_embedding" in renamed:
        tied = "prompt_encoder.shared_embedding.positional_embedding"
        renamed[tied] = renamed["shared_image_embedding.positional_embedding"]
    return renamed, dropped, origins


def _check_fit(renamed: Dict, origins: Dict, expected: Dict, what: str) -> None:
    """Raises ValueError starting with ``what`` unless ``renamed`` has exactly the keys of the
    model's state dict ``expected``, with its shapes (missing, extra and wrong keys named)."""
    missing = [key for key in expected if key not in renamed]
    unexpected = [f"{origins.get(key, key)} (as {key})" for key in renamed if key not in expected]
    shapes = [
        f"{key} {tuple(renamed[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in renamed and renamed[key].shape != value.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: missing {len(missing)} [{key_names(missing, 10)}]; keys the model lacks "
            f"{len(unexpected)} [{key_names(unexpected, 10)}]; "
            f"wrong shapes {len(shapes)} [{key_names(shapes, 5)}]"
        )


def convert_segmenter(
    kind: str,
    src: str,
    out_dir: str,
    *,
    variant: Optional[str] = None,
    config: Optional[str] = None,
    force: bool = False,
) -> Dict:
    """
    Converts an original SAM (``kind="sam"``) or SAM 2 (``"sam2"``) checkpoint.

    Returns:
        ``{"variant", "out_dir", "files", "dropped": [video-only keys], "normalization",
        "normalization_set"}``: ``normalization`` is ``{"image_mean", "image_std"}`` read from a
        SAM file's pixel_mean / pixel_std (or {}), ``normalization_set`` whether they differ
        from the processor's own and were written into it.

    Raises:
        FileNotFoundError: ``src`` or ``config`` does not exist.
        FileExistsError: an output file exists and ``force`` is false.
        ValueError: keys the mapping does not know, keys the model needs but the file lacks, or
            shapes that differ (all named); a variant that does not match the weights.
    """
    from transformers import Sam2Model, SamModel

    state = _state_dict_of(load_checkpoint_file(src), src)
    normalization = {}
    if kind == "sam":
        state, normalization = _split_normalization(state, src)
    renamed, dropped, origins = _renamed_state(kind, state, src)
    model_class = {"sam": SamModel, "sam2": Sam2Model}[kind]
    make_config = {"sam": _sam_config, "sam2": _sam2_config}[kind]
    try:
        if config is not None:
            hf_config, variant = _config_from_file(config, kind), f"--config {config}"
        else:
            hf_config, variant = make_config(state, variant)
    except KeyError as error:
        raise ValueError(f"{src} lacks {error}, a key every {kind} checkpoint has") from error
    model = model_class(hf_config).eval()
    _check_fit(
        renamed, origins, model.state_dict(), f"{src} does not fit the {kind} model ({variant})"
    )
    model.load_state_dict({key: value.float() for key, value in renamed.items()}, strict=True)
    image_size = int(hf_config.prompt_encoder_config.image_size)
    processor_normalization = _processor_normalization(normalization)
    files = _write(model, _processor(kind, image_size, processor_normalization), out_dir, force)
    load_segmenter(out_dir)  # what was written loads back strictly
    return {
        "variant": variant,
        "out_dir": out_dir,
        "files": files,
        "dropped": dropped,
        "normalization": normalization,
        "normalization_set": bool(processor_normalization),
    }


def _write(model, processor, out_dir: str, force: bool) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    staging = temporary_directory(os.path.join(out_dir, "convert"))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        names = sorted(os.listdir(staging))
        targets = [os.path.join(out_dir, name) for name in names]
        refuse_existing(targets, force=force)
        for name, target in zip(names, targets):
            publish(os.path.join(staging, name), target, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.segment.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=["sam", "sam2"], help="the original code base")
    parser.add_argument("src", help="the original checkpoint (.pth / .pt)")
    parser.add_argument("out_dir", help="the transformers folder to write")
    parser.add_argument(
        "--variant",
        choices=sorted(SAM_VARIANTS) + sorted(SAM2_VARIANTS),
        help="the model size (default: read from the weights' shapes; checked when given)",
    )
    parser.add_argument(
        "--config", help="a transformers config.json for a model of another size than released"
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        report = convert_segmenter(
            args.kind,
            args.src,
            args.out_dir,
            variant=args.variant,
            config=args.config,
            force=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if report["dropped"]:
        prefixes = sorted({key.split(".")[0] for key in report["dropped"]})
        print(
            f"dropped: {len(report['dropped'])} keys of SAM 2's video modules "
            f"({', '.join(prefixes)}): the image segmenter has no use for them"
        )
    if report["normalization"]:
        mean, std = report["normalization"]["image_mean"], report["normalization"]["image_std"]
        what = (
            "set as the processor's image_mean / image_std"
            if report["normalization_set"]
            else "the processor's own ImageNet normalization, kept"
        )
        print(
            f"pixel_mean / pixel_std: mean {[round(v, 4) for v in mean]}, std "
            f"{[round(v, 4) for v in std]} (0..1 pixels): {what}"
        )
    print(
        f"Wrote {args.out_dir} ({args.kind}, {report['variant']}): "
        + json.dumps([os.path.basename(path) for path in report["files"]])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
