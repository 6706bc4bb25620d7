"""Transfer from a closed-set DINO: its shared parts -> Grounding DINO's keys (a partial
checkpoint; the paper's "DINO -> Grounding DINO" ablation).

Two key layouts are read:

- the official DINO repository (IDEA-Research/DINO), whose names Grounding DINO's official code
  kept: ``backbone.0.*`` (Swin) or ``backbone.0.body.*`` (torchvision ResNet),
  ``input_proj.<l>.{0,1}``, ``transformer.level_embed``,
  ``transformer.encoder.layers.<i>.{self_attn.*, norm1, linear1, linear2, norm2}``,
  ``transformer.decoder.layers.<i>.{cross_attn (deformable), norm1, self_attn
  (nn.MultiheadAttention in_proj_*/out_proj), norm2, linear1, linear2, norm3}``,
  ``transformer.decoder.{norm, ref_point_head}``, ``transformer.{tgt_embed, enc_output,
  enc_output_norm, enc_out_bbox_embed}``, ``bbox_embed.<i>`` (shared by default),
  ``class_embed.<i>``, ``transformer.enc_out_class_embed``, ``label_enc``;
- detrex's ``projects/dino``: ``backbone.*`` (detectron2 ResNet / Swin),
  ``neck.convs.<l>.{conv,norm}``, ``neck.extra_convs.<j>.{conv,norm}``,
  ``transformer.level_embeds``, ``transformer.encoder.layers.<i>.{attentions.0, ffns.0.layers.0.0,
  ffns.0.layers.1, norms.0, norms.1}``, ``transformer.decoder.layers.<i>.{attentions.0.attn
  (self), attentions.1 (deformable cross), ffns.0.*, norms.0 (after self-attn), norms.1 (after
  cross-attn), norms.2}``, ``transformer.{tgt_embed, enc_output, enc_output_norm}``,
  ``transformer.decoder.{norm, ref_point_head}``, ``bbox_embed.<0..L>`` (one per decoder layer,
  the last for the encoder proposals), ``class_embed.*``, ``label_enc``.

The closed-set classifiers and the label embedding of denoising have no counterpart (Grounding
DINO classifies by text similarity and denoises with text features) and are dropped. This model
shares one box head over decoder layers: a DINO whose layers have different heads gives the last
layer's (reported). The text encoder, the feature fusion and text layers of the enhancer and the
decoder's text cross-attention stay at their initialisation.
"""

import re
from typing import Dict, List, Mapping, Tuple

import torch

from .keys import convert_official_state_dict, rename

__all__ = ["convert_dino_state_dict", "dino_layout", "convert_torchvision_resnet_state_dict"]

_CLOSED_SET = {
    r"^(transformer\.decoder\.)?class_embed\.": "closed-set classifier (no counterpart)",
    r"^transformer\.enc_out_class_embed\.": "closed-set encoder classifier (no counterpart)",
    r"^label_enc\.": "denoising label embedding (Grounding DINO denoises with text features)",
}

_DETREX_RULES = [
    (r"^neck\.convs\.(\d+)\.conv\.", r"neck.projections.\1."),
    (r"^neck\.convs\.(\d+)\.norm\.", r"neck.projections.\1.norm."),
    (r"^transformer\.level_embeds$", "enhancer.level_embed"),
    (
        r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.",
        r"enhancer.layers.\1.image_layer.self_attn.",
    ),
    (
        r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.",
        r"enhancer.layers.\1.image_layer.linear1.",
    ),
    (
        r"^transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.",
        r"enhancer.layers.\1.image_layer.linear2.",
    ),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.0\.", r"enhancer.layers.\1.image_layer.norm1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.1\.", r"enhancer.layers.\1.image_layer.norm2."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.",
        r"decoder.layers.\1.self_attn.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.1\.", r"decoder.layers.\1.cross_attn."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.",
        r"decoder.layers.\1.linear1.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"decoder.layers.\1.linear2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.0\.", r"decoder.layers.\1.norm2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.1\.", r"decoder.layers.\1.norm1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.2\.", r"decoder.layers.\1.norm3."),
    (r"^transformer\.decoder\.ref_point_head\.", "decoder.ref_point_head."),
    (r"^transformer\.decoder\.norm\.", "decoder.norm."),
    (r"^transformer\.tgt_embed\.", "query_selector.tgt_embed."),
    (r"^transformer\.enc_output\.", "query_selector.enc_output."),
    (r"^transformer\.enc_output_norm\.", "query_selector.enc_output_norm."),
]

_TORCHVISION_RESNET_RULES = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (
        r"^layer(\d)\.(\d+)\.conv(\d)\.",
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.",
    ),
    (
        r"^layer(\d)\.(\d+)\.bn(\d)\.",
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.",
    ),
    (
        r"^layer(\d)\.(\d+)\.downsample\.0\.",
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.",
    ),
    (
        r"^layer(\d)\.(\d+)\.downsample\.1\.",
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.",
    ),
]


def convert_torchvision_resnet_state_dict(state: Mapping[str, torch.Tensor]) -> Dict:
    """torchvision ResNet keys (``conv1``, ``bn1``, ``layer<k>.<b>.conv<j>/bn<j>/downsample``)
    -> detectron2's (``stem.conv1``, ``res<k+1>.<b>.conv<j>[.norm]``, ``shortcut[.norm]``);
    ``num_batches_tracked`` counters are dropped (detectron2's frozen BatchNorm has none)."""
    return {
        rename(k, _TORCHVISION_RESNET_RULES): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


def dino_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"dino-detrex"`` or ``"dino-official"``; ValueError when neither."""
    if any(re.match(r"^transformer\.encoder\.layers\.\d+\.attentions\.", k) for k in state):
        return "dino-detrex"
    if any(re.match(r"^transformer\.encoder\.layers\.\d+\.self_attn\.", k) for k in state):
        return "dino-official"
    raise ValueError("not a DINO state dict: no transformer.encoder.layers.<i> attention keys")


def _num_decoder_layers(state) -> int:
    pattern = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _box_head(state, prefix: str, layers: List[int]) -> Tuple[int, str]:
    """The decoder box head to keep among ``prefix<i>.*`` for ``i`` in ``layers``: the first
    when all are equal (shared), else the last one (with a note)."""
    heads = [
        {k[len(f"{prefix}{i}.") :]: v for k, v in state.items() if k.startswith(f"{prefix}{i}.")}
        for i in layers
    ]
    present = [i for i, head in zip(layers, heads) if head]
    if not present:
        return -1, ""
    first = heads[layers.index(present[0])]
    shared = all(
        set(h) == set(first) and all(torch.equal(h[k], first[k]) for k in first) for h in heads if h
    )
    if shared:
        return present[0], ""
    return present[-1], (
        f"the DINO's decoder layers have different box heads; this model shares one over its "
        f"layers and starts from the last layer's ({prefix}{present[-1]})"
    )


def convert_dino_state_dict(
    state: Mapping[str, torch.Tensor], layout: str
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """
    A DINO state dict (``module.`` prefixes allowed) -> this model's keys, for the parts DINO
    and Grounding DINO share.

    Args:
        layout: ``"dino-official"`` or ``"dino-detrex"`` (see :func:`dino_layout`).

    Returns:
        (converted, dropped, notes): the renamed tensors (under ``backbone.``, ``neck.``,
        ``enhancer.layers.<i>.image_layer``, ``enhancer.level_embed``, ``query_selector.``,
        ``decoder.``), ``{source key: reason}`` for what was dropped on purpose or has no
        counterpart, and notes for the user (box-head choice, ResNet style).
    """
    if layout not in ("dino-official", "dino-detrex"):
        raise ValueError(f"Unknown DINO layout {layout!r}; expected dino-official or dino-detrex")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    dropped: Dict[str, str] = {}
    notes: List[str] = []
    for key in list(state):
        for pattern, reason in _CLOSED_SET.items():
            if re.match(pattern, key):
                dropped[key] = reason
                del state[key]
                break
    num_layers = _num_decoder_layers(state)
    # detrex: bbox_embed.<0..L-1> decoder layers, bbox_embed.<L> encoder proposals; official:
    # bbox_embed.<0..L-1>, the encoder's is transformer.enc_out_bbox_embed.
    kept, note = _box_head(state, "bbox_embed.", list(range(num_layers)))
    if note:
        notes.append(note)
    heads: Dict[str, torch.Tensor] = {}
    for key in list(state):
        match = re.match(r"^(transformer\.decoder\.)?bbox_embed\.(\d+)\.(.*)$", key)
        if not match:
            continue
        index, rest = int(match.group(2)), match.group(3)
        value = state.pop(key)
        if match.group(1) is None and index == kept:
            heads[f"bbox_embed.0.{rest}"] = value
        elif layout == "dino-detrex" and match.group(1) is None and index == num_layers:
            heads[f"transformer.enc_out_bbox_embed.{rest}"] = value
        else:
            dropped[key] = "copy or other layer of the box head (this model shares one)"
    state.update(heads)
    if any(
        k.startswith("backbone.0.body.")
        or k.startswith("backbone.res")
        or k.startswith("backbone.stem.")
        for k in state
    ):
        notes.append(
            "the image body is a ResNet: DINO's (torchvision style) has the stride in the 3x3 "
            "convs, detectron2's ResNetBackbone in the 1x1 convs (MSRA style); the weights load "
            "but the features differ until the backbone is fine-tuned"
        )
    if layout == "dino-official":
        body = {
            k[len("backbone.0.body.") :]: v
            for k, v in state.items()
            if k.startswith("backbone.0.body.")
        }
        state = {k: v for k, v in state.items() if not k.startswith("backbone.0.body.")}
        for key, value in convert_torchvision_resnet_state_dict(body).items():
            state[f"backbone.0.{key}"] = value
        converted, ignored = convert_official_state_dict(state)
        for key in ignored:
            dropped[key] = "copy of a kept tensor"
        return converted, dropped, notes
    return _convert_detrex(state, dropped), dropped, notes


def _convert_detrex(state: Dict[str, torch.Tensor], dropped: Dict[str, str]) -> Dict:
    num_convs = len({m.group(1) for k in state if (m := re.match(r"^neck\.convs\.(\d+)\.", k))})
    rules = _DETREX_RULES + [
        (
            r"^neck\.extra_convs\.(\d+)\.(conv|norm)\.",
            lambda m: f"neck.projections.{num_convs + int(m.group(1))}."
            + ("" if m.group(2) == "conv" else "norm."),
        ),
        (r"^bbox_embed\.0\.", "decoder.bbox_embed."),
        (r"^transformer\.enc_out_bbox_embed\.", "query_selector.bbox_embed."),
    ]
    converted = {}
    for key, value in state.items():
        if re.search(r"(relative_position_index|attn_mask)$", key):
            dropped[key] = "buffer rebuilt from the window size"
            continue
        converted[rename(key, rules)] = value
    return converted
