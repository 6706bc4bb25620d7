"""Swin Transformer image backbone, as Grounding DINO uses it.

Matches the official Grounding DINO Swin (``groundingdino/models/GroundingDINO/backbone/
swin_transformer.py``, itself from mmdet's Swin): 4x4 patch embedding with LayerNorm, each
stage pads its map to a multiple of the window size, shifted-window attention with the
shift mask computed for the padded size (region mask value -100), relative position bias,
patch merging, a LayerNorm on every returned stage, and stochastic depth.

Window attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`
with the relative position bias (plus the shift mask) as an additive float mask, which is
the reference's ``softmax(q k^T * scale + bias + mask) v``.

Parameter names follow the official model except for the output norms, which live in
``out_norms.<stage>`` instead of ``norm<stage>``. :func:`convert_official_swin_state_dict`
and :func:`convert_hf_swin_state_dict` map the two published layouts to ours.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from timm.layers import DropPath
from torch import nn

__all__ = [
    "SWIN_VARIANTS",
    "SwinTransformer",
    "build_swin_transformer",
    "convert_official_swin_state_dict",
    "convert_hf_swin_state_dict",
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

# Value the official code adds to logits between different shift regions.
_SHIFT_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of window_size) -> [B, nW, ws*ws, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """[B, nW, ws*ws, C] -> [B, H, W, C], the inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shift_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None
) -> torch.Tensor:
    """Additive mask that keeps shifted windows from mixing regions that were not adjacent.

    Args:
        height, width: padded map size (multiples of ``window_size``).

    Returns:
        [nW, ws*ws, ws*ws] float, 0 within a region and -100 across regions.
    """
    region = torch.zeros((1, height, width, 1), device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window_size)[0, :, :, 0]  # [nW, ws*ws]
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill_(diff != 0, _SHIFT_MASK_VALUE)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    Args:
        dim: channels C.
        window_size: window side ws.
        num_heads: attention heads.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Swin stage dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(
            1
        )  # [2, ws*ws]
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # [2, N, N]
        index = rel[0] * (2 * window_size - 1) + rel[1]
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """[num_heads, ws*ws, ws*ws] bias added to the attention logits."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: [B, nW, N, C] window tokens (N = ws*ws).
            mask: optional [nW, N, N] additive shift mask.

        Returns:
            [B, nW, N, C].
        """
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, N, d]
        bias = self.relative_position_bias()
        if mask is not None:
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # [nW, heads, N, N]
        bias = bias.to(q.dtype)
        if b == 1:  # 4-d inputs take the fused kernel
            out = F.scaled_dot_product_attention(
                q[0], k[0], v[0], attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
            ).unsqueeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
            )
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP, each with a residual and drop path.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side.
        shift_size: cyclic shift (0 or window_size // 2).
        mlp_ratio: MLP hidden size / dim.
        drop, attn_drop, drop_path: dropout rates.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: [B, H, W, C].
            shift_mask: [nW, N, N] mask for the padded size (used when shifted).

        Returns:
            [B, H, W, C].
        """
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x)
        # Pad after the norm (zeros), to multiples of the window, like the reference.
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if shift else None)
        y = window_reverse(y, ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        if pad_b or pad_r:
            y = y[:, :h, :w]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm -> Linear(4C, 2C); odd sizes are zero-padded."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        downsample: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, H, W, C] -> (stage output [B, H, W, C], input of the next stage)."""
        ws = self.window_size
        h, w = x.shape[1:3]
        mask = None
        if len(self.blocks) > 1:
            mask = shift_window_mask(
                -(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift_size, x.device
            )
            mask = mask.to(x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Zero-pad to a multiple of the patch size, Conv(patch, stride patch), LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, ceil(H/p), ceil(W/p), C]."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Swin Transformer returning normalised feature maps of selected stages.

    Args:
        embed_dim: channels of stage 0 (doubled at every stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side.
        mlp_ratio: MLP hidden size / dim.
        patch_size: patch embedding stride.
        in_chans: image channels.
        drop_rate, attn_drop_rate: dropout rates.
        drop_path_rate: stochastic depth, rising linearly to this value over all blocks.
        out_indices: stages to return (each gets a LayerNorm ``out_norms.<i>``).
        use_checkpoint: gradient checkpointing of every block in training.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (1, 2, 3),
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        if not all(0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"out_indices {out_indices} out of range for {len(depths)} stages")
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depth,
                    num_heads[i],
                    window_size,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[first : first + depth],
                    downsample=i < len(depths) - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
        self.out_norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(self.num_features[i]) for i in self.out_indices}
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned maps, in ``out_indices`` order."""
        return [self.num_features[i] for i in self.out_indices]

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """
        Args:
            images: [B, 3, H, W] normalised images (any H, W).

        Returns:
            one [B, C_i, H_i, W_i] map per ``out_indices`` entry, with
            H_0 = ceil(H / 4) and H_{i+1} = ceil(H_i / 2). The maps are NCHW views of
            channels-last memory.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        x = self.pos_drop(self.patch_embed(images))
        outs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(self.out_norms[str(i)](out).permute(0, 3, 1, 2))
        return outs


def build_swin_transformer(name: str, **kwargs) -> SwinTransformer:
    """Builds a named variant (``SWIN_VARIANTS``); ``kwargs`` override or add arguments."""
    if name not in SWIN_VARIANTS:
        raise KeyError(f"Unknown Swin variant {name!r}; known: {sorted(SWIN_VARIANTS)}")
    embed_dim, depths, num_heads, window_size = SWIN_VARIANTS[name]
    args = dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size)
    args.update(kwargs)
    return SwinTransformer(**args)


def convert_official_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official Grounding DINO Swin keys (after ``backbone.0.``) -> ours.

    Only the output norms move (``norm<i>.*`` -> ``out_norms.<i>.*``); the
    ``relative_position_index`` buffers are dropped (we rebuild them).
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index") or key.endswith("attn_mask"):
            continue
        out[re.sub(r"^norm(\d+)\.", r"out_norms.\1.", key)] = value
    return out


_HF_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def convert_hf_swin_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' ``SwinBackbone`` keys (after ``model.backbone.conv_encoder.model.``) -> ours.

    ``embeddings.patch_embeddings.projection`` -> ``patch_embed.proj``, ``embeddings.norm``
    -> ``patch_embed.norm``, ``encoder.layers`` -> ``layers``, block renames in
    ``_HF_BLOCK_RENAMES``, query/key/value concatenated into ``attn.qkv``, and
    ``hidden_states_norms.stage<k>`` -> ``out_norms.<k-1>`` (HF counts the stem as stage 0).
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue
        new = key.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
        new = new.replace("embeddings.norm.", "patch_embed.norm.")
        new = new.replace("encoder.layers.", "layers.")
        m = re.match(r"^hidden_states_norms\.stage(\d+)\.(.*)$", new)
        if m:
            new = f"out_norms.{int(m.group(1)) - 1}.{m.group(2)}"
        m = re.match(
            r"^(layers\.\d+\.blocks\.\d+\.)attention\.self\.(query|key|value)\.(\w+)$", new
        )
        if m:
            qkv.setdefault(m.group(1) + "attn.qkv." + m.group(3), {})[m.group(2)] = value
            continue
        for old, repl in _HF_BLOCK_RENAMES.items():
            new = re.sub(
                r"(\.blocks\.\d+\.)" + re.escape(old) + r"(\.|$)", r"\g<1>" + repl + r"\g<2>", new
            )
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(
                f"HF Swin state dict lacks {sorted({'query', 'key', 'value'} - set(parts))} "
                f"for {key}"
            )
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out
