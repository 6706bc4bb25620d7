"""mmdetection 3.x ``GroundingDINO`` state dicts -> the official Grounding DINO key layout (which
:func:`convert_official_state_dict` and the official config builder then take over).

mmdet's names (its ``tools/model_converters/groundingdino_to_mmdet.py`` maps the official
checkpoint onto them; this is the inverse): ``backbone.*`` (mmdet Swin, see
:func:`convert_mmdet_swin_state_dict`), ``neck.convs.<l>.{conv,gn}``,
``neck.extra_convs.<j>.{conv,gn}``, ``language_model.language_backbone.body.model.*`` (BERT),
``text_feat_map``, ``level_embed``, ``encoder.layers.<i>.{self_attn, ffn.layers.0.0,
ffn.layers.1, norms.0, norms.1}``, ``encoder.text_layers.<i>.{self_attn.attn, ffn.*, norms.*}``,
``encoder.fusion_layers.<i>.*`` (the official names), ``memory_trans_fc``,
``memory_trans_norm``, ``query_embedding``, ``decoder.layers.<i>.{self_attn.attn, norms.0,
cross_attn_text.attn, norms.1, cross_attn, norms.2, ffn.*, norms.3}``,
``decoder.{ref_point_head, norm}``, ``bbox_head.reg_branches.<i>.{0,2,4}`` (decoder layers
0..L-1, the encoder proposals at L), ``bbox_head.cls_branches.<i>.{bias, log_scale}`` (only when
the head was configured with them), ``dn_query_generator.label_embedding`` (unused).

mmdet's contrastive head multiplies the logits by ``exp(log_scale)``; this project's
:class:`ContrastiveHead` by ``exp(log_scale) / sqrt(C)``, so ``log_scale`` gains
``0.5 * ln(C)``. A head with a ``bias`` and no ``log_scale`` parameter is MM-Grounding-DINO's
``log_scale="auto"`` (a constant ``1 / sqrt(C)``): ours gets ``fixed_scale=True``.

MM-Grounding-DINO and LLMDet train one head per decoder layer (mmdet's ``share_pred_layer``
off): when the decoder layers' branches differ (:func:`mmdet_per_layer_heads`), every
``bbox_embed.<i>`` is kept and the contrastive parameters go to ``head.<i>.*``. LLMDet's
training-only language-model branch (``lmm``, its connectors and its own ``ref_point_head``)
is dropped and named.
"""

import math
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .keys import rename
from .swin_sources import convert_mmdet_swin_state_dict

__all__ = ["mmdet_per_layer_heads", "mmdet_to_official_state_dict"]

_RULES = [
    (r"^language_model\.language_backbone\.body\.model\.", "bert."),
    (r"^text_feat_map\.", "feat_map."),
    (r"^level_embed$", "transformer.level_embed"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (
        r"^encoder\.(layers|text_layers)\.(\d+)\.ffn\.layers\.0\.0\.",
        r"transformer.encoder.\1.\2.linear1.",
    ),
    (
        r"^encoder\.(layers|text_layers)\.(\d+)\.ffn\.layers\.1\.",
        r"transformer.encoder.\1.\2.linear2.",
    ),
    (r"^encoder\.(layers|text_layers)\.(\d+)\.norms\.0\.", r"transformer.encoder.\1.\2.norm1."),
    (r"^encoder\.(layers|text_layers)\.(\d+)\.norms\.1\.", r"transformer.encoder.\1.\2.norm2."),
    (
        r"^encoder\.text_layers\.(\d+)\.self_attn\.attn\.",
        r"transformer.encoder.text_layers.\1.self_attn.",
    ),
    (r"^encoder\.fusion_layers\.", "transformer.encoder.fusion_layers."),
    (r"^memory_trans_fc\.", "transformer.enc_output."),
    (r"^memory_trans_norm\.", "transformer.enc_output_norm."),
    (r"^query_embedding\.", "transformer.tgt_embed."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.attn\.", r"transformer.decoder.layers.\1.self_attn."),
    (
        r"^decoder\.layers\.(\d+)\.cross_attn_text\.attn\.",
        r"transformer.decoder.layers.\1.ca_text.",
    ),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^decoder\.layers\.(\d+)\.norms\.0\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^decoder\.layers\.(\d+)\.norms\.1\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"^decoder\.layers\.(\d+)\.norms\.2\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^decoder\.layers\.(\d+)\.norms\.3\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^decoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^decoder\.ref_point_head\.", "transformer.decoder.ref_point_head."),
    (r"^decoder\.norm\.", "transformer.decoder.norm."),
]

_LLMDET_BRANCH = "LLMDet's language-model branch (training only; detection does not use it)"
_IGNORED = {
    r"^dn_query_generator\.": "mmdet's denoising label embedding (unused: text features)",
    r"^lmm\.": _LLMDET_BRANCH,
    r"^(region_)?connector\.": _LLMDET_BRANCH,
    r"^(image_seperate|img_sep)\.": _LLMDET_BRANCH,
    r"^ref_point_head\.": _LLMDET_BRANCH,  # the decoder's is decoder.ref_point_head
}


def _count(state, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def mmdet_per_layer_heads(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the decoder layers' ``bbox_head.{reg,cls}_branches.<i>`` differ (one head per
    layer, as MM-Grounding-DINO and LLMDet) rather than being copies of one shared head."""
    num_layers = _count(state, r"^decoder\.layers\.(\d+)\.")
    first: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^bbox_head\.(reg|cls)_branches\.(\d+)\.(.*)$", key)
        if not match or int(match.group(2)) >= num_layers:
            continue
        name = f"{match.group(1)}.{match.group(3)}"
        if name in first and not torch.equal(first[name], value):
            return True
        first.setdefault(name, value)
    return False


def _head_parameters(
    state: Dict[str, torch.Tensor], num_layers: int, hidden_dim: int, per_layer: bool
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``bbox_head.cls_branches.<i>.{bias,log_scale}`` -> this model's ``head.*`` (decoder,
    equal over layers) or ``head.<i>.*`` (``per_layer``), and ``query_selector.head.*``
    (encoder proposals, i = L)."""
    out: Dict[str, torch.Tensor] = {}
    notes: List[str] = []
    branches: Dict[int, Dict[str, torch.Tensor]] = {}
    for key in [k for k in state if k.startswith("bbox_head.cls_branches.")]:
        match = re.match(r"^bbox_head\.cls_branches\.(\d+)\.(bias|log_scale)$", key)
        if not match:
            raise ValueError(f"{key}: unknown mmdet contrastive head parameter")
        branches.setdefault(int(match.group(1)), {})[match.group(2)] = state.pop(key)
    if not branches:
        return out, notes
    decoder = [branches.get(i, {}) for i in range(num_layers)]
    heads = [(f"head.{i}.", branch) for i, branch in enumerate(decoder)]
    if not per_layer:
        heads = [("head.", decoder[0])]
    for name in decoder[0]:
        if not per_layer and any(not torch.equal(b[name], decoder[0][name]) for b in decoder):
            raise ValueError(
                f"bbox_head.cls_branches.*.{name} differs between decoder layers; convert "
                "it as a checkpoint with one head per layer"
            )
    for prefix, branch in heads + [("query_selector.head.", branches.get(num_layers, {}))]:
        if "bias" in branch:
            out[prefix + "bias"] = branch["bias"].reshape(())
        if "log_scale" in branch:
            out[prefix + "log_scale"] = branch["log_scale"].reshape(()) + 0.5 * math.log(hidden_dim)
        elif "bias" in branch:
            notes.append(
                f"bbox_head.cls_branches has a bias and no log_scale: read as MM-Grounding-DINO's "
                f"log_scale='auto', a constant 1/sqrt({hidden_dim}) (fixed_scale=True)"
            )
    return out, notes[:1]


def mmdet_to_official_state_dict(
    state: Mapping[str, torch.Tensor], per_layer_heads: Optional[bool] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """
    mmdet ``GroundingDINO`` ``state_dict`` -> (official-layout state dict, head parameters in
    this model's keys, ``{dropped source key: reason}``, notes). Keys it does not know keep
    their names, so that the conversion reports them as unexpected. ``per_layer_heads``: None
    reads it off the weights (:func:`mmdet_per_layer_heads`).
    """
    if per_layer_heads is None:
        per_layer_heads = mmdet_per_layer_heads(state)
    state = dict(state)
    dropped: Dict[str, str] = {}
    for key in list(state):
        for pattern, reason in _IGNORED.items():
            if re.match(pattern, key):
                dropped[key] = reason
                del state[key]
    num_layers = _count(state, r"^decoder\.layers\.(\d+)\.")
    hidden_dim = state["level_embed"].shape[-1] if "level_embed" in state else 256
    head, notes = _head_parameters(state, num_layers, hidden_dim, per_layer_heads)
    num_convs = _count(state, r"^neck\.convs\.(\d+)\.")
    gn = {"conv": "0", "gn": "1"}
    rules = _RULES + [
        (
            r"^neck\.convs\.(\d+)\.(conv|gn)\.",
            lambda m: f"input_proj.{m.group(1)}.{gn[m.group(2)]}.",
        ),
        (
            r"^neck\.extra_convs\.(\d+)\.(conv|gn)\.",
            lambda m: f"input_proj.{num_convs + int(m.group(1))}.{gn[m.group(2)]}.",
        ),
        (
            r"^bbox_head\.reg_branches\.(\d+)\.(\d+)\.",
            lambda m: (
                f"bbox_embed.{m.group(1)}"
                if int(m.group(1)) < num_layers
                else "transformer.enc_out_bbox_embed"
            )
            + f".layers.{int(m.group(2)) // 2}.",
        ),
    ]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    official = {f"backbone.0.{k}": v for k, v in convert_mmdet_swin_state_dict(backbone).items()}
    for key, value in state.items():
        if not key.startswith("backbone."):
            official[rename(key, rules)] = value
    return official, head, dropped, notes
