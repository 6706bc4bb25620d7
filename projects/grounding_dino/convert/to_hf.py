"""
This model -> a transformers folder: ``python -m grounding_dino.convert to-hf CONFIG WEIGHTS
OUT_DIR`` writes ``config.json``, ``model.safetensors``, the image processor's and the
tokenizer's files, which ``AutoModelForZeroShotObjectDetection.from_pretrained(OUT_DIR)`` and
``AutoProcessor.from_pretrained(OUT_DIR)`` load (and so transformers' zero-shot object
detection pipeline).

No second key table: the key mapping is the ``convert hf`` renaming run backwards. Every
element of an empty transformers model of the matching config gets a unique integer id; the
``hf`` converter renames (and concatenates) those ids as it would weights, so each of this
model's tensors comes out holding the ids of the transformers elements it is made of. Writing
this model's values at those ids fills the transformers model. A parameter of this model that
no transformers parameter maps to (the learned logit scale and bias of the demo head, a ResNet
body) is an error naming it; so is a transformers parameter left unfilled. Before anything is
written, both models run on one image and caption and must agree (token scores to 1e-4, boxes
to 1e-4 of the image size).
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch

from ..io.atomic import refuse_existing, replace_atomic
from ..modeling.backbone import SWIN_VARIANTS
from .sources import convert_state_dict

__all__ = ["export_to_hf", "hf_config_from_lazy", "hf_state_dict_from_ours", "main"]

logger = logging.getLogger(__name__)

SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE = 1e-4  # in units of the image size


def _unsupported(field: str, value, wanted) -> ValueError:
    return ValueError(
        f"model.{field}={value!r} has no transformers Grounding DINO equivalent "
        f"(transformers' model has {wanted!r})"
    )


def _swin_config(model_cfg):
    """transformers ``SwinConfig`` of the config's ``SwinBackbone``."""
    from transformers import SwinConfig

    backbone = model_cfg.backbone
    if backbone.get("name") != "SwinBackbone":
        raise ValueError(
            f"model.backbone.name={backbone.get('name')!r}: the transformers export takes a Swin "
            "body ('SwinBackbone'); transformers' Grounding DINO has no counterpart for this "
            "body's parameters here"
        )
    variant = backbone.variant
    if isinstance(variant, str):
        embed_dim, depths, heads, window = SWIN_VARIANTS[variant]
    else:
        embed_dim, depths, heads, window = (
            variant["embed_dim"],
            variant["depths"],
            variant["num_heads"],
            variant["window_size"],
        )
    stages = [i + 1 for i in backbone.out_indices]  # transformers counts the stem as stage 0
    return SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(heads),
        window_size=window,
        drop_path_rate=backbone.get("drop_path_rate", 0.2),
        out_indices=stages,
        out_features=[f"stage{i}" for i in stages],
    )


def _check_derived_sizes(model_cfg) -> None:
    """transformers derives the text layers' and the fusion's sizes from the encoder's."""
    enhancer = model_cfg.enhancer
    derived = {
        "enhancer.text_heads": enhancer.num_heads // 2,
        "enhancer.fusion_heads": enhancer.num_heads // 2,
        "enhancer.text_ffn_dim": enhancer.ffn_dim // 2,
        "enhancer.fusion_dim": enhancer.ffn_dim // 2,
    }
    for field, wanted in derived.items():
        value = enhancer[field.split(".")[1]]
        if value != wanted:
            raise _unsupported(field, value, wanted)
    offset = model_cfg.text_encoder.get("bert_position_offset", 0)
    if offset != 0:
        raise _unsupported("text_encoder.bert_position_offset", offset, 0)
    for name in ("enhancer", "query_selector", "decoder"):
        if "." in str(model_cfg[name].get("name", "")):
            raise ValueError(f"model.{name}.name={model_cfg[name].name!r} is not a built-in part")


def _heads_of(model_cfg) -> List:
    """The contrastive head nodes: the decoder's (one, or the per-layer template) and the
    encoder proposals'."""
    head = model_cfg.head
    decoder_head = head.head if "head" in head else head  # layer_heads(head=...)
    return [("head", decoder_head), ("query_selector.head", model_cfg.query_selector.head)]


def model_type_of(model_cfg) -> str:
    """``"grounding-dino"`` (shared heads) or ``"mm-grounding-dino"`` (one class and box head
    per decoder layer, logits / sqrt(C) plus a learned bias); ValueError for other mixes."""
    per_layer_boxes = bool(model_cfg.decoder.get("per_layer_box_heads", False))
    per_layer_classes = "head" in model_cfg.head
    if per_layer_boxes != per_layer_classes:
        raise ValueError(
            f"model.decoder.per_layer_box_heads={per_layer_boxes} with "
            f"{'per-layer' if per_layer_classes else 'one shared'} contrastive head: transformers "
            "has shared box and class heads (grounding-dino) or per-layer ones "
            "(mm-grounding-dino), not a mix"
        )
    model_type = "mm-grounding-dino" if per_layer_boxes else "grounding-dino"
    for name, head in _heads_of(model_cfg):
        fixed = bool(head.get("fixed_scale", False))
        if model_type == "mm-grounding-dino" and not fixed:
            raise _unsupported(f"{name}.fixed_scale", fixed, True)
        if model_type == "grounding-dino" and fixed:
            raise _unsupported(f"{name}.fixed_scale", fixed, False)
    return model_type


def hf_config_from_lazy(model_cfg, text_config) -> Tuple[str, object]:
    """
    The transformers config of a lazy ``cfg.model`` (the inverse of ``convert hf``'s).

    Args:
        text_config: the built text encoder's ``BertConfig``.

    Returns:
        (model_type, config): ``"grounding-dino"`` and a ``GroundingDinoConfig``, or
        ``"mm-grounding-dino"`` and an ``MMGroundingDinoConfig`` (per-layer heads).
    """
    from transformers import GroundingDinoConfig, MMGroundingDinoConfig

    model_type = model_type_of(model_cfg)
    _check_derived_sizes(model_cfg)
    enhancer, decoder = model_cfg.enhancer, model_cfg.decoder
    text = text_config.to_dict()
    for field in ("_name_or_path", "architectures", "transformers_version", "torch_dtype"):
        text.pop(field, None)
    args = dict(
        backbone_config=_swin_config(model_cfg),
        text_config=text,
        d_model=model_cfg.hidden_dim,
        num_feature_levels=model_cfg.num_feature_levels,
        max_text_len=model_cfg.max_text_len,
        positional_embedding_temperature=model_cfg.position_embedding.temperature,
        encoder_layers=enhancer.num_layers,
        encoder_ffn_dim=enhancer.ffn_dim,
        encoder_attention_heads=enhancer.num_heads,
        encoder_n_points=enhancer.num_points,
        fusion_droppath=enhancer.fusion_drop_path,
        num_queries=model_cfg.query_selector.num_queries,
        decoder_layers=decoder.num_layers,
        decoder_attention_heads=decoder.num_heads,
        decoder_ffn_dim=decoder.ffn_dim,
        decoder_n_points=decoder.num_points,
        dropout=decoder.dropout,
        fusion_dropout=0.0,
        two_stage=True,
        embedding_init_target=True,
    )
    if model_type == "mm-grounding-dino":
        return model_type, MMGroundingDinoConfig(**args)
    shared = dict(decoder_bbox_embed_share=True, two_stage_bbox_embed_share=False)
    return model_type, GroundingDinoConfig(**args, **shared)


def _element_ids(hf_state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], int]:
    """An int64 id per element of ``hf_state``'s floating tensors (tied tensors share ids)."""
    ids, first_of, total = {}, {}, 0
    for key, tensor in hf_state.items():
        if not tensor.is_floating_point():
            continue  # rebuilt index buffers (Swin's relative_position_index)
        storage = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if storage not in first_of:
            first_of[storage] = total
            total += tensor.numel()
        start = first_of[storage]
        ids[key] = torch.arange(start, start + tensor.numel()).reshape(tensor.shape)
    return ids, total


def hf_state_dict_from_ours(
    ours: Dict[str, torch.Tensor], hf_model, model_type: str
) -> Dict[str, torch.Tensor]:
    """
    transformers' state dict holding this model's weights ``ours``, through the ``hf``
    converter run on element ids (see the module docstring).

    Raises:
        ValueError: a parameter of ours that transformers' model lacks, or one of theirs that
            ours does not fill (names them), or a shape that differs.
    """
    hf_state = hf_model.state_dict()
    ids, total = _element_ids(hf_state)
    per_layer = model_type == "mm-grounding-dino"
    traced, _ = convert_state_dict("hf", ids, per_layer_heads=per_layer)
    lacking = sorted(set(ours) - set(traced))
    if lacking:
        raise ValueError(
            f"transformers' {type(hf_model).__name__} has no parameter for: {', '.join(lacking)} "
            "(this model's weights would be lost; not exported)"
        )
    values = torch.zeros(total, dtype=torch.float32)
    filled = torch.zeros(total, dtype=torch.bool)
    for key, tensor in ours.items():
        index = traced[key]
        if index.dtype != torch.int64 or index.shape != tensor.shape:
            raise ValueError(
                f"{key}: shape {tuple(tensor.shape)} does not match transformers' "
                f"{tuple(index.shape)} (the config maps to a different transformers model)"
            )
        values[index.reshape(-1)] = tensor.detach().reshape(-1).float().cpu()
        filled[index.reshape(-1)] = True
    out = {}
    for key, tensor in hf_state.items():
        if key not in ids:
            out[key] = tensor
            continue
        index = ids[key].reshape(-1)
        if not bool(filled[index].all()):
            raise ValueError(f"transformers' {key} has no counterpart in this model (not exported)")
        out[key] = values[index].reshape(tensor.shape).to(tensor.dtype)
    return out


def _compare_outputs(
    model, hf_model, tokenizer, caption: str = "a cat . a remote control ."
) -> Dict:
    """Runs both models on one random 3x96x128 image; raises ValueError when they differ."""
    from ..text import PromptRun

    torch.manual_seed(0)
    image = torch.randn(1, 3, 96, 128)
    encoded = tokenizer([caption], return_tensors="pt")
    run = PromptRun(0, caption, model.prompt_encoder.tokenize(caption)["input_ids"])
    with torch.no_grad():
        ours = model.forward_transformer([image[0]], [run])
        theirs = hf_model(
            pixel_values=image,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            token_type_ids=encoded["token_type_ids"],
            pixel_mask=torch.ones(1, 96, 128, dtype=torch.long),
        )
    length = encoded["input_ids"].shape[1]
    score = (
        (ours["pred_logits"][..., :length].sigmoid() - theirs.logits[..., :length].sigmoid())
        .abs()
        .max()
        .item()
    )
    box = (ours["pred_boxes"] - theirs.pred_boxes).abs().max().item()
    if not (score < SCORE_TOLERANCE and box < BOX_TOLERANCE):
        raise ValueError(
            f"transformers' model differs from this one on the same weights (token scores by "
            f"{score:.2e}, boxes by {box:.2e}); a setting of the config has no transformers "
            "equivalent. Nothing was written."
        )
    return {"max_score_difference": score, "max_box_difference": box}


def _processor(cfg, tokenizer):
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    from ..resize import official_resize_from_lazy_config

    resize = official_resize_from_lazy_config(cfg)
    model_cfg = cfg.model
    if model_cfg.get("input_format", "RGB") != "RGB":
        raise _unsupported("input_format", model_cfg.input_format, "RGB")
    images = GroundingDinoImageProcessor(
        size={"shortest_edge": resize.short_edge, "longest_edge": resize.max_size},
        image_mean=[v / 255.0 for v in model_cfg.pixel_mean],
        image_std=[v / 255.0 for v in model_cfg.pixel_std],
    )
    return GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer)


def _publish(staging: str, out_dir: str, force: bool) -> List[str]:
    """Moves the files of ``staging`` into ``out_dir``, each atomically; refuses (before any
    move) when one exists and not ``force``."""
    names = sorted(os.listdir(staging))
    refuse_existing([os.path.join(out_dir, n) for n in names], force=force)
    for name in names:
        replace_atomic(os.path.join(staging, name), os.path.join(out_dir, name))
    return [os.path.join(out_dir, n) for n in names]


def export_to_hf(
    config: str, weights: str, out_dir: str, overrides: Sequence[str] = (), force: bool = False
) -> Dict:
    """
    Writes the transformers folder of a lazy config and its weights (see the module docstring).

    Returns:
        {"model_type", "files", "max_score_difference", "max_box_difference"}.

    Raises:
        FileExistsError: an output file exists and not ``force`` (named).
        ValueError: a parameter or a setting without a transformers counterpart (named), or
            outputs that differ.
    """
    from .. import model_zoo
    from ..text.tokenizer import load_tokenizer

    refuse_existing(
        [os.path.join(out_dir, n) for n in ("config.json", "model.safetensors")], force=force
    )
    cfg = model_zoo.get_config(config, overrides)
    model = model_zoo.build_model(cfg, weights, device="cpu")
    model_type, hf_config = hf_config_from_lazy(cfg.model, model.text_encoder.bert.config)
    hf_class = _hf_model_class(model_type)
    hf_model = hf_class(hf_config).eval()
    hf_state = hf_state_dict_from_ours(model.state_dict(), hf_model, model_type)
    hf_model.load_state_dict(hf_state, strict=True)
    tokenizer = load_tokenizer(model.prompt_encoder.tokenizer_name_or_path)
    report = _compare_outputs(model, hf_model, tokenizer)
    processor = _processor(cfg, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    # Everything is written into a private folder inside OUT_DIR first (same file system), then
    # each file is renamed into place.
    staging = tempfile.mkdtemp(prefix=".to-hf-", dir=out_dir)
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        files = _publish(staging, out_dir, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model_type": model_type, "files": files, **report}


def _hf_model_class(model_type: str):
    import transformers

    names = {
        "grounding-dino": "GroundingDinoForObjectDetection",
        "mm-grounding-dino": "MMGroundingDinoForObjectDetection",
    }
    return getattr(transformers, names[model_type])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grounding_dino.convert to-hf",
        description="Writes a transformers folder (config.json, model.safetensors, the image "
        "processor's and tokenizer's files) from a lazy config and its weights.",
    )
    parser.add_argument("config", help="lazy config (.py/.yaml, e.g. a training's config.yaml)")
    parser.add_argument("weights", help="checkpoint (e.g. output/model_final.pth)")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = export_to_hf(args.config, args.weights, args.out_dir, args.overrides, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Wrote {args.out_dir} ({report['model_type']}): "
        + ", ".join(os.path.basename(f) for f in report["files"])
    )
    print(
        f"checked against this model: token scores differ by at most "
        f"{report['max_score_difference']:.1e}, boxes by {report['max_box_difference']:.1e}"
    )
    return 0
