"""The Swin Transformer body: detectron2's ``SwinTransformer`` with Grounding DINO's variants.

detectron2's Swin (``detectron2.modeling.backbone.SwinTransformer``, from mmdet's, as the
official Grounding DINO's) computes exactly what the official model does, in the same order (a
re-implementation on fused attention kernels differs in the last bits, and is not faster on
the CPU), and uses its key layout (``patch_embed.*``, ``layers.<i>.blocks.<j>.*``, ``norm<i>.*``
on returned stages), so an official checkpoint loads after dropping its ``backbone.0.`` prefix
(the converters are in :mod:`grounding_dino.convert.swin_sources`).

:class:`SwinBackbone` adds the named variants of the official model, makes
``relative_position_index`` a non-persistent buffer (it is rebuilt from the window size, and
transformers' checkpoints do not store it), keeps frozen stages in eval mode under
``train()`` (as the official model does: no stochastic depth in frozen stages) and replaces
detectron2's reentrant block checkpointing (which gives a block no gradients when its input
requires none: after a frozen patch embedding, the 13 parameters of Swin-T's first block) by
non-reentrant checkpointing of each stage, in training only. With ``traceable`` on (see
:mod:`..switches`), the stages run on the shape-agnostic forwards of :mod:`.swin_traceable`.
"""

import warnings
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as checkpoint
from detectron2.modeling.backbone import SwinTransformer
from detectron2.modeling.backbone.swin import Mlp, WindowAttention

from ..recomputed_ffn import can_chunk, chunked_ffn
from ..registry import IMAGE_BACKBONE_REGISTRY
from ..utils import rowwise_in_chunks
from .swin_traceable import basic_layer_forward, patch_embed_forward

__all__ = ["SWIN_VARIANTS", "SwinBackbone", "swin_variant_from_sizes"]

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
# layer of the first stage, one row per stride-4 pixel, is the body's largest tensor.
MLP_CHUNK_TOKENS = 4096


class _RowChunkedMlp(Mlp):
    """detectron2's ``Mlp`` (same parameters, keys and outputs), run on chunks of tokens; in
    training its backward computes the hidden layer again instead of keeping it
    (:func:`..recomputed_ffn.chunked_ffn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., C] tokens -> [..., C]."""
        if not (self.training and torch.is_grad_enabled()):
            return rowwise_in_chunks(super().forward, x, MLP_CHUNK_TOKENS)
        if type(self.act) is not torch.nn.GELU or not can_chunk(
            None, self.fc1, self.fc2, self.drop
        ):
            return super().forward(x)
        activation = "gelu" if self.act.approximate == "none" else "gelu_tanh"
        return chunked_ffn(x, None, self.fc1, self.fc2, activation, MLP_CHUNK_TOKENS)


class _UnbindWindowAttention(WindowAttention):
    """detectron2's ``WindowAttention`` (same parameters, keys and results) taking q, k and v
    from the fused projection with ``unbind``: indexing it three times (``qkv[0]``...) makes
    the backward build three zero-filled gradients of the whole [3, windows, heads, N, d]
    tensor and add them, where ``unbind``'s backward stacks the three once."""

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """
        Args:
            x: [windows * B, N, C] tokens of each window.
            mask: [windows, N, N] of 0 / -inf (shifted windows), or None.

        Returns:
            [windows * B, N, C]
        """
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        area = self.window_size[0] * self.window_size[1]  # = tokens: windows are padded
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, tokens, tokens)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(x))


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
        use_checkpoint: activation checkpointing in training: True for every stage, or the
            indices of the stages to checkpoint, e.g. (0, 1): the early stages hold the most
            activations per multiply-add (the most tokens, the fewest channels), so they free
            the most memory for the least recomputation.
    """

    # Shape-agnostic forwards (see modeling.switches); values equal detectron2's.
    traceable = False

    def __init__(
        self,
        *,
        variant: Union[str, Mapping],
        out_indices: Sequence[int],
        drop_path_rate: float,
        frozen_stages: int,
        use_checkpoint: Union[bool, Sequence[int]],
    ):
        sizes = _variant_sizes(variant)
        out_indices = tuple(int(i) for i in out_indices)
        num_stages = len(sizes["depths"])
        if not out_indices or not all(0 <= i < num_stages for i in out_indices):
            raise ValueError(f"Swin out_indices {out_indices} must be in [0, {num_stages})")
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"Swin out_indices {out_indices} must be increasing")
        if not isinstance(use_checkpoint, bool):
            use_checkpoint = tuple(int(i) for i in use_checkpoint)
            if not all(0 <= i < num_stages for i in use_checkpoint):
                raise ValueError(
                    f"Swin use_checkpoint stages {use_checkpoint} must be in [0, {num_stages})"
                )
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
            elif type(module) is WindowAttention:
                module.__class__ = _UnbindWindowAttention
            index = getattr(module, "relative_position_index", None)
            if isinstance(index, torch.Tensor):
                module.register_buffer("relative_position_index", index, persistent=False)

    def _checkpointed_stages(self) -> Tuple[int, ...]:
        """The stages whose activations are recomputed in the backward (training only)."""
        if not self.training or not self.use_checkpoint:
            return ()
        if self.use_checkpoint is True:
            return tuple(range(len(self.layers)))
        return tuple(self.use_checkpoint)

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
        checkpointed = self._checkpointed_stages() if torch.is_grad_enabled() else ()
        if not (checkpointed or self.traceable):
            return super().forward(images)
        if self.traceable:
            x = patch_embed_forward(self.patch_embed, images)
        else:
            x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outputs = {}
        for i, layer in enumerate(self.layers):
            if self.traceable:
                out, h_out, w_out, x, h, w = basic_layer_forward(layer, x, h, w)
            elif i in checkpointed:
                out, h_out, w_out, x, h, w = checkpoint.checkpoint(
                    layer, x, h, w, use_reentrant=False
                )
            else:
                out, h_out, w_out, x, h, w = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out).view(-1, h_out, w_out, self.num_features[i])
                outputs[f"p{i}"] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


def swin_variant_from_sizes(embed_dim: int, depths: Sequence[int], window_size: int) -> str:
    """The name of the ``SWIN_VARIANTS`` entry with these sizes (ValueError if none)."""
    for name, (dim, variant_depths, _, variant_window) in SWIN_VARIANTS.items():
        if (dim, tuple(variant_depths), variant_window) == (embed_dim, tuple(depths), window_size):
            return name
    raise ValueError(
        f"No known Swin variant has embed_dim={embed_dim}, depths={tuple(depths)} and "
        f"window_size={window_size}; known: {sorted(SWIN_VARIANTS)}"
    )
