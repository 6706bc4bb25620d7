"""The Swin Transformer body: detectron2's ``SwinTransformer`` with Grounding DINO's variants.

detectron2's Swin (``detectron2.modeling.backbone.SwinTransformer``, from mmdet's, as the
official Grounding DINO's) computes exactly what the official model does and uses its key
layout (``patch_embed.*``, ``layers.<i>.blocks.<j>.*``, ``norm<i>.*`` on returned stages), so
an official checkpoint loads after dropping its ``backbone.0.`` prefix.

Measured before choosing it over this project's former SDPA-based Swin (same weights, random
inputs up to 800x1333): detectron2's output equals the official Swin-T's exactly (max abs
difference 0.0), the SDPA one's differed by 3.6e-6. Forward of Swin-T at 800x1333 on 2 threads,
the two alternating, quiet machine: fp32 median 1.96 s vs 1.88 s (19 pairs: median paired
ratio 1.02-1.03, single runs spread +-5%; CPU time 3.7 s vs 4.1 s per forward); bf16 autocast
0.99 s vs 0.97 s. So at most ~3% on the body, ~1% of a whole-model forward: within the noise.

:class:`SwinBackbone` adds the named variants of the official model, makes
``relative_position_index`` a non-persistent buffer (it is rebuilt from the window size, and
transformers' checkpoints do not store it), keeps frozen stages in eval mode under
``train()`` (as the official model does: no stochastic depth in frozen stages) and replaces
detectron2's reentrant block checkpointing (which gives a block no gradients when its input
requires none: after a frozen patch embedding, the 13 parameters of Swin-T's first block) by
non-reentrant checkpointing of each stage, in training only.
"""

import re
import warnings
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as checkpoint
from detectron2.modeling.backbone import SwinTransformer
from detectron2.modeling.backbone.swin import Mlp

from ..registry import IMAGE_BACKBONE_REGISTRY
from ..utils import rowwise_in_chunks

__all__ = [
    "SWIN_VARIANTS",
    "SwinBackbone",
    "convert_official_swin_state_dict",
    "convert_hf_swin_state_dict",
    "swin_variant_from_sizes",
]

# name -> (embed_dim, depths, num_heads, window_size); the official model's table.
SWIN_VARIANTS: Dict[str, Tuple[int, Tuple[int, ...], Tuple[int, ...], int]] = {
    "swin_T_224_1k": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_B_224_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_B_384_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_L_224_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7),
    "swin_L_384_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}
SWIN_VARIANTS["swin_L"] = SWIN_VARIANTS["swin_L_384_22k"]

_VARIANT_FIELDS = ("embed_dim", "depths", "num_heads", "window_size")

# Tokens per chunk of the blocks' MLPs in inference (rowwise_in_chunks): the [B, N, 4C] hidden
# layer of the first stage is 102 MB at 800x1333.
MLP_CHUNK_TOKENS = 4096


class _RowChunkedMlp(Mlp):
    """detectron2's ``Mlp`` (same parameters and keys), run on chunks of tokens in inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return super().forward(x)
        return rowwise_in_chunks(super().forward, x, MLP_CHUNK_TOKENS)


def _variant_sizes(variant: Union[str, Mapping]) -> Dict:
    """A variant name or a mapping of ``_VARIANT_FIELDS`` -> the SwinTransformer size args."""
    if isinstance(variant, str):
        if variant not in SWIN_VARIANTS:
            raise ValueError(f"Unknown Swin variant {variant!r}; known: {sorted(SWIN_VARIANTS)}")
        return dict(zip(_VARIANT_FIELDS, SWIN_VARIANTS[variant]))
    if not isinstance(variant, Mapping) or set(variant) != set(_VARIANT_FIELDS):
        raise ValueError(
            f"Swin variant must be a name in {sorted(SWIN_VARIANTS)} or a mapping with exactly "
            f"the keys {list(_VARIANT_FIELDS)}, got {variant!r}"
        )
    sizes = {k: variant[k] for k in _VARIANT_FIELDS}
    sizes["depths"], sizes["num_heads"] = tuple(sizes["depths"]), tuple(sizes["num_heads"])
    if len(sizes["depths"]) != len(sizes["num_heads"]):
        raise ValueError(f"Swin variant {variant!r}: depths and num_heads differ in length")
    return sizes


@IMAGE_BACKBONE_REGISTRY.register()
class SwinBackbone(SwinTransformer):
    """
    Swin Transformer returning the normalised maps ``p<i>`` of stages ``out_indices`` (stride
    ``2 ** (i + 2)``, ``embed_dim * 2 ** i`` channels).

    Args:
        variant: a name of ``SWIN_VARIANTS`` (``"swin_T_224_1k"``, ``"swin_B_384_22k"``, ...),
            or a mapping ``{"embed_dim", "depths", "num_heads", "window_size"}`` (converted
            transformers checkpoints of other sizes).
        out_indices: stages to return, e.g. (1, 2, 3).
        drop_path_rate: stochastic depth, rising linearly to this value over all blocks.
        frozen_stages: detectron2's (mmdet's) convention: -1 nothing; 0 or 1 the patch
            embedding; k >= 2 also stages 0..k-2. Frozen modules get ``requires_grad=False``
            and stay in eval mode.
        use_checkpoint: gradient checkpointing of every stage in training.
    """

    def __init__(
        self,
        *,
        variant: Union[str, Mapping],
        out_indices: Sequence[int],
        drop_path_rate: float,
        frozen_stages: int,
        use_checkpoint: bool,
    ):
        sizes = _variant_sizes(variant)
        out_indices = tuple(int(i) for i in out_indices)
        num_stages = len(sizes["depths"])
        if not out_indices or not all(0 <= i < num_stages for i in out_indices):
            raise ValueError(f"Swin out_indices {out_indices} must be in [0, {num_stages})")
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"Swin out_indices {out_indices} must be increasing")
        if not -1 <= frozen_stages <= num_stages + 1:
            raise ValueError(f"Swin frozen_stages={frozen_stages} not in [-1, {num_stages + 1}]")
        with warnings.catch_warnings():  # detectron2's torch.meshgrid and timm import
            warnings.filterwarnings("ignore", message=".*meshgrid.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*timm.models.layers.*")
            super().__init__(
                **sizes,
                drop_path_rate=drop_path_rate,
                out_indices=out_indices,
                frozen_stages=frozen_stages,
                use_checkpoint=False,  # see forward
            )
        self.use_checkpoint = use_checkpoint
        for module in self.modules():
            if type(module) is Mlp:
                module.__class__ = _RowChunkedMlp
            index = getattr(module, "relative_position_index", None)
            if isinstance(index, torch.Tensor):
                module.register_buffer("relative_position_index", index, persistent=False)

    @property
    def size_divisibility(self) -> int:
        """32, the stride of the last stage (detectron2's property misspells its attribute)."""
        return 32

    def train(self, mode: bool = True) -> "SwinBackbone":
        super().train(mode)
        self._freeze_stages()  # frozen modules back to eval mode
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: [B, 3, H, W] normalised images (any H, W).

        Returns:
            ``{"p<i>": [B, embed_dim * 2**i, H_i, W_i]}`` for ``i`` in ``out_indices``, with
            H_0 = ceil(H / 4) and H_{i+1} = ceil(H_i / 2).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if not (self.use_checkpoint and self.training and torch.is_grad_enabled()):
            return super().forward(images)
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outputs = {}
        for i, layer in enumerate(self.layers):
            out, h_out, w_out, x, h, w = checkpoint.checkpoint(layer, x, h, w, use_reentrant=False)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out).view(-1, h_out, w_out, self.num_features[i])
                outputs[f"p{i}"] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


def convert_official_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Grounding DINO Swin keys (after ``backbone.0.``) -> :class:`SwinBackbone`'s:
    the same names, without the ``relative_position_index`` buffers (rebuilt)."""
    return {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}


_HF_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.blocks\.(\d+)\.output\.dense\.", r".blocks.\1.mlp.fc2."),
]


def convert_hf_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' ``SwinBackbone`` keys (after ``model.backbone.conv_encoder.model.``) ->
    :class:`SwinBackbone`'s.

    Renames as ``_HF_RENAMES``, concatenates query/key/value into ``attn.qkv``, and maps
    ``hidden_states_norms.stage<k>`` to ``norm<k-1>`` (transformers counts the stem as stage
    0); ``relative_position_index`` buffers are dropped.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue
        m = re.match(r"^hidden_states_norms\.stage(\d+)\.(.*)$", key)
        if m:
            out[f"norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
            continue
        new = key
        for pattern, replacement in _HF_RENAMES:
            new = re.sub(pattern, replacement, new)
        m = re.match(
            r"^(layers\.\d+\.blocks\.\d+\.)attention\.self\.(query|key|value)\.(\w+)$", new
        )
        if m:
            qkv.setdefault(f"{m.group(1)}attn.qkv.{m.group(3)}", {})[m.group(2)] = value
            continue
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise KeyError(f"HF Swin state dict lacks {missing} for {key}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def swin_variant_from_sizes(embed_dim: int, depths: Sequence[int], window_size: int) -> str:
    """The name of the ``SWIN_VARIANTS`` entry with these sizes (ValueError if none)."""
    for name, (dim, variant_depths, _, variant_window) in SWIN_VARIANTS.items():
        if (dim, tuple(variant_depths), variant_window) == (embed_dim, tuple(depths), window_size):
            return name
    raise ValueError(
        f"No known Swin variant has embed_dim={embed_dim}, depths={tuple(depths)} and "
        f"window_size={window_size}; known: {sorted(SWIN_VARIANTS)}"
    )
