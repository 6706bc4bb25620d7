"""Builds the matching lazy config for a source checkpoint and writes the converted files."""

import json
import logging
import os
import re
from typing import Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate

from ..io.atomic import atomic_output, refuse_existing
from ..modeling.backbone import SWIN_VARIANTS, swin_variant_from_sizes
from ..packaged_configs import get_config_file
from .checkpoint import load_checkpoint_file, load_training_checkpoint
from .partial import convert_partial_checkpoint
from .sources import PARTIAL_SOURCES, convert_state_dict, detect_source, unwrap_state_dict

__all__ = ["convert_checkpoint", "default_config_path"]

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "bert-base-uncased"
# transformers' config.json model_type -> whether the model has one head per decoder layer.
HF_MODEL_TYPES = {"grounding-dino": False, "mm-grounding-dino": True}


def default_config_path(source: str, src: str, per_layer_heads: bool = False) -> str:
    """The packaged lazy config of the model a checkpoint's name suggests (Swin-B for
    "swinb"/"swin_b"/"swin-b"/"base", else Swin-T); with ``per_layer_heads``, the
    MM-Grounding-DINO config (the converter sets the body's sizes from the weights)."""
    if per_layer_heads:
        return get_config_file("mm_grounding_dino_swin_t.py")
    name = os.path.basename(os.path.normpath(src)).lower()
    is_base = any(tag in name for tag in ("swinb", "swin_b", "swin-b", "base"))
    filename = "grounding_dino_swin_b_cogcoor.py" if is_base else "grounding_dino_swin_t_ogc.py"
    return get_config_file(filename)


def _bert_config_from_state(
    state: Dict[str, torch.Tensor], prefix: str, tokenizer: Optional[str]
) -> dict:
    """BertConfig fields read off the BERT weights (the official file stores no config)."""
    words = state[f"{prefix}embeddings.word_embeddings.weight"]
    layers = {
        int(m.group(1))
        for k in state
        if (m := re.match(rf"^{re.escape(prefix)}encoder\.layer\.(\d+)\.", k))
    }
    hidden = words.shape[1]
    config = {
        "vocab_size": words.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "intermediate_size": state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": state[f"{prefix}embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0],
        "num_attention_heads": max(1, hidden // 64),
    }
    local_config = os.path.join(tokenizer or "", "config.json")
    if tokenizer and os.path.isfile(local_config):
        with open(local_config) as f:
            found = json.load(f)
        if found.get("hidden_size") == hidden:
            config["num_attention_heads"] = found["num_attention_heads"]
    return config


def _count_layers(state, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _set_image_side(model, variant, out_indices: List[int]) -> None:
    """Sets the Swin body (``variant``: a name of ``SWIN_VARIANTS`` or a sizes mapping) and
    the neck's ``in_channels`` to match it."""
    if model.backbone.get("name") != "SwinBackbone":
        raise ValueError(
            f"The base config's model.backbone.name is {model.backbone.get('name')!r}; converted "
            "checkpoints need a 'SwinBackbone' config (pass a Swin config with --config)"
        )
    embed_dim = SWIN_VARIANTS[variant][0] if isinstance(variant, str) else variant["embed_dim"]
    model.backbone.update(variant=variant, out_indices=list(out_indices))
    model.neck.in_channels = [embed_dim * 2**i for i in out_indices]


def _official_config(state, config_path: str, tokenizer: Optional[str]):
    cfg = LazyConfig.load(config_path)
    model = cfg.model
    # Read the structure off the weights, so that any official-format file converts.
    num_stages = _count_layers(state, "backbone.0.layers.")
    depths = [_count_layers(state, f"backbone.0.layers.{i}.blocks.") for i in range(num_stages)]
    bias_rows = state["backbone.0.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    variant = swin_variant_from_sizes(
        embed_dim=state["backbone.0.patch_embed.proj.weight"].shape[0],
        depths=depths,
        window_size=(round(bias_rows**0.5) + 1) // 2,
    )
    out_indices = [i for i in range(num_stages) if f"backbone.0.norm{i}.weight" in state]
    _set_image_side(model, variant, out_indices)
    model.num_feature_levels = _count_layers(state, "input_proj.")
    model.enhancer.num_layers = _count_layers(state, "transformer.encoder.layers.")
    model.decoder.num_layers = _count_layers(state, "transformer.decoder.layers.")
    model.query_selector.num_queries = state["transformer.tgt_embed.weight"].shape[0]
    model.prompt_encoder.tokenizer_name_or_path = tokenizer or DEFAULT_TOKENIZER
    model.text_encoder.pretrained = False
    model.text_encoder.bert_config = _bert_config_from_state(state, "bert.", tokenizer)
    return cfg


def _hf_swin_variant(backbone: dict, config_file: str):
    """The ``SwinBackbone`` variant of transformers' Swin config: a ``SWIN_VARIANTS`` name,
    else a sizes mapping."""
    checks = {
        "patch_size": 4,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "layer_norm_eps": 1e-5,
    }
    for field, wanted in checks.items():
        if field in backbone and backbone[field] != wanted:
            raise ValueError(
                f"{config_file}: backbone_config.{field}={backbone[field]!r} is not supported "
                f"(expected {wanted!r})"
            )
    sizes = {
        "embed_dim": backbone["embed_dim"],
        "depths": list(backbone["depths"]),
        "num_heads": list(backbone["num_heads"]),
        "window_size": backbone["window_size"],
    }
    for name, (dim, depths, heads, window) in SWIN_VARIANTS.items():
        if (dim, list(depths), list(heads), window) == tuple(sizes.values()):
            return name
    return sizes


def hf_model_type(folder: str) -> str:
    """``model_type`` of a transformers folder's config.json; ValueError naming the file when it
    is neither ``grounding-dino`` nor ``mm-grounding-dino``."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found (expected a transformers folder)")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: model_type={model_type!r} is not supported (expected one of "
            f"{', '.join(map(repr, HF_MODEL_TYPES))})"
        )
    return model_type


def _hf_config(folder: str, config_path: Optional[str], tokenizer: Optional[str]):
    per_layer_heads = HF_MODEL_TYPES[hf_model_type(folder)]
    config_file = os.path.join(folder, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    checks = {
        "two_stage": True,
        "embedding_init_target": True,
        "decoder_bbox_embed_share": True,
        "use_timm_backbone": False,
        "position_embedding_type": "sine",
    }
    for field, wanted in checks.items():
        if field in hf and hf[field] != wanted:
            raise ValueError(
                f"{config_file}: {field}={hf[field]!r} is not supported (expected {wanted!r})"
            )
    cfg = LazyConfig.load(config_path or default_config_path("hf", folder, per_layer_heads))
    model = cfg.model
    d_model = hf["d_model"]
    enc_heads, enc_ffn = hf["encoder_attention_heads"], hf["encoder_ffn_dim"]
    model.hidden_dim = d_model
    model.num_feature_levels = hf["num_feature_levels"]
    model.max_text_len = hf["max_text_len"]
    backbone = hf["backbone_config"]
    # transformers counts the patch embedding as stage 0.
    out_indices = [i - 1 for i in backbone.get("out_indices", [2, 3, 4])]
    _set_image_side(model, _hf_swin_variant(backbone, config_file), out_indices)
    model.backbone.drop_path_rate = backbone.get("drop_path_rate", 0.2)
    model.position_embedding.temperature = hf.get("positional_embedding_temperature", 20)
    model.enhancer.update(
        num_layers=hf["encoder_layers"],
        ffn_dim=enc_ffn,
        num_heads=enc_heads,
        num_points=hf["encoder_n_points"],
        text_heads=enc_heads // 2,
        text_ffn_dim=enc_ffn // 2,
        fusion_dim=enc_ffn // 2,
        fusion_heads=enc_heads // 2,
        fusion_drop_path=hf.get("fusion_droppath", 0.1),
    )
    model.query_selector.num_queries = hf["num_queries"]
    model.decoder.update(
        num_layers=hf["decoder_layers"],
        num_heads=hf["decoder_attention_heads"],
        ffn_dim=hf["decoder_ffn_dim"],
        num_points=hf["decoder_n_points"],
    )
    text_config = dict(hf["text_config"])
    bert_fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
    )
    model.prompt_encoder.tokenizer_name_or_path = tokenizer or DEFAULT_TOKENIZER
    model.text_encoder.update(
        pretrained=False,
        bert_config={k: text_config[k] for k in bert_fields if k in text_config},
    )
    return cfg


def save_config_atomic(cfg, path: str) -> None:
    """``LazyConfig.save`` to ``path``, atomically. LazyConfig.save logs and falls back to a
    pickle when the config does not serialise to YAML; here that is an error (a
    ``config.yaml`` that cannot be loaded would replace a good one)."""
    with atomic_output(path) as temporary:
        LazyConfig.save(cfg, temporary)
        fallback = temporary + ".pkl"
        if os.path.lexists(fallback):
            os.remove(fallback)
            raise ValueError(f"the config for {path} does not serialise to YAML")


def _load_hf_weights(folder: str) -> Dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_checkpoint_file(path)
    raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in {folder}")


def _check_duplicates(
    source: Dict[str, torch.Tensor],
    ignored: List[str],
    converted: Dict,
    shared_prefixes: Dict[str, str],
) -> None:
    """Dropped copies of a head must equal the kept tensor (``shared_prefixes``: pattern of a
    copy's key -> ``re.sub`` replacement giving the kept key's prefix)."""
    for key in ignored:
        for pattern, target in shared_prefixes.items():
            match = re.match(pattern, key)
            if match:
                kept = converted.get(match.expand(target) + key[match.end() :])
                if kept is not None and not torch.equal(kept, source[key]):
                    raise ValueError(
                        f"{key} differs from the shared box head; this checkpoint "
                        f"does not share decoder box heads"
                    )


def _full_source_config(source, state, src, config: Optional[str], tokenizer: Optional[str]):
    """(cfg, converted, info, official-layout state) of an ``official`` or ``mmdet`` state."""
    converted, info = convert_state_dict(source, state)
    official = info.pop("official_layout", state)
    per_layer = info["per_layer_heads"]
    cfg = _official_config(
        official, config or default_config_path(source, src, per_layer), tokenizer
    )
    # A per-layer config's head is layer_heads(head=ContrastiveHead(...)); its copies start
    # equal, so layer 0's parameters say which the template needs.
    head = cfg.model.head.head if "head" in cfg.model.head else cfg.model.head
    heads = [("head.0." if per_layer else "head.", head)]
    for prefix, node in heads + [("query_selector.head.", cfg.model.query_selector.head)]:
        # mmdet heads configured with a bias / log scale: the model gets the parameters; a
        # bias without a log scale is MM-Grounding-DINO's constant 1/sqrt(C).
        for name in ("bias", "log_scale"):
            node[f"{name}_init"] = 0.0 if prefix + name in converted else None
        node["fixed_scale"] = prefix + "bias" in converted and prefix + "log_scale" not in converted
    return cfg, converted, info, official


def convert_checkpoint(
    source: str,
    src: str,
    out_dir: str,
    tokenizer: Optional[str] = None,
    config: Optional[str] = None,
    device: str = "auto",
    force: bool = False,
) -> Dict:
    """
    Converts ``src`` and writes ``out_dir/model.pth`` (and, for full sources, the matching
    ``out_dir/config.yaml``), each atomically. An existing output file is an error naming it,
    before anything is read, unless ``force`` (then it is replaced).

    Args:
        source: ``official`` (also Open-GroundingDino training checkpoints), ``hf``, ``mmdet``,
            a partial source (``imagenet-swin``, ``dino-official``, ``dino-detrex``), or
            ``auto`` (recognised from the keys).

    Returns:
        Full sources: {"missing", "unexpected", "ignored", "dropped", "notes",
        "skipped_entries"}; partial sources: the report of :func:`convert_partial_checkpoint`.
    """
    weights_path = os.path.abspath(os.path.join(out_dir, "model.pth"))
    config_path = os.path.abspath(os.path.join(out_dir, "config.yaml"))
    # Partial sources write model.pth only; a config.yaml beside it is not theirs to refuse.
    refuse_existing([weights_path], force=force)
    if source == "hf":
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} is not a folder (expected a transformers model)")
        refuse_existing([config_path], force=force)
        state = _load_hf_weights(src)
        cfg = _hf_config(src, config, tokenizer)
        per_layer = HF_MODEL_TYPES[hf_model_type(src)]
        converted, info = convert_state_dict("hf", state, per_layer_heads=per_layer)
        info["skipped_entries"] = []
        shared = {
            r"^bbox_embed\.\d+\.": "decoder.bbox_embed.",
            r"^model\.decoder\.bbox_embed\.\d+\.": "decoder.bbox_embed.",
        }
        if per_layer:  # the per-layer heads' tied copies are checked by the key conversion
            shared = {}
    else:
        if source == "auto" and os.path.isdir(src):
            return convert_checkpoint("hf", src, out_dir, tokenizer, config, device, force)
        if source not in ("auto", "official", "mmdet") + PARTIAL_SOURCES:
            raise ValueError(
                f"Unknown source {source!r}; expected official, hf, mmdet, imagenet-swin, "
                "dino-official, dino-detrex or auto"
            )
        state, skipped = unwrap_state_dict(load_training_checkpoint(src), src)
        source = detect_source(state) if source == "auto" else source
        if source in PARTIAL_SOURCES:
            return convert_partial_checkpoint(
                source, state, out_dir, src=src, config=config, skipped=skipped, force=force
            )
        if source == "grounding-dino":
            raise ValueError(f"{src} already has this project's keys; nothing to convert")
        refuse_existing([config_path], force=force)
        cfg, converted, info, state = _full_source_config(source, state, src, config, tokenizer)
        info["skipped_entries"] = skipped
        shared = {
            r"^bbox_embed\.\d+\.": "decoder.bbox_embed.",
            r"^transformer\.decoder\.bbox_embed\.\d+\.": "decoder.bbox_embed.",
        }
        if info["per_layer_heads"]:
            shared = {r"^transformer\.decoder\.bbox_embed\.(\d+)\.": r"decoder.bbox_embed.\1."}
    ignored = [k for k, reason in info["dropped"].items() if reason.startswith("copy")]
    _check_duplicates(state, ignored, converted, shared)

    model = instantiate(cfg.model)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in converted)
    unexpected = sorted(k for k in converted if k not in expected)
    for key in sorted(set(expected) & set(converted)):
        if expected[key].shape != converted[key].shape:
            raise ValueError(
                f"{src}: {key} has shape {tuple(converted[key].shape)}, the model "
                f"expects {tuple(expected[key].shape)}"
            )
    os.makedirs(out_dir, exist_ok=True)
    with atomic_output(weights_path) as temporary:
        torch.save({"model": {k: v.contiguous() for k, v in converted.items()}}, temporary)
    cfg.train = dict(cfg.get("train", {}))
    cfg.train["device"] = device
    cfg.train["init_checkpoint"] = weights_path
    cfg.train["init_partial"] = False  # the converted weights cover the whole model
    save_config_atomic(cfg, config_path)
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            logger.warning("%d %s keys, e.g. %s", len(keys), kind, keys[:5])
    return {
        "missing": missing,
        "unexpected": unexpected,
        "ignored": ignored,
        "dropped": info["dropped"],
        "notes": info["notes"],
        "skipped_entries": info["skipped_entries"],
    }
