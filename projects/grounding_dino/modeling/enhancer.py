"""The feature enhancer: early fusion of image and text features (replaces DINO's encoder).

Each layer runs (a) bi-directional image<->text cross-attention, (b) text self-attention
under the sub-sentence mask and (c) multi-scale deformable self-attention on image tokens.
"""

import functools
from typing import Iterable, Sequence, Tuple

import torch
import torch.utils.checkpoint as checkpoint
from timm.layers import DropPath
from torch import nn

from .attention import BiMultiHeadAttention, MultiheadAttention
from .deformable_attention import MultiScaleDeformableAttention
from .ffn import PostNormFFNLayer
from .recomputed_ffn import can_chunk, chunked_ffn
from .recomputed_linear import layer_norm_linear
from .registry import FEATURE_ENHANCER_REGISTRY
from .structures import EncodedText, ImageTokens
from .switches import level_sizes_of
from .utils import rowwise_in_chunks, sine_embedding

__all__ = [
    "BiAttentionBlock",
    "TextEnhancerLayer",
    "DeformableEncoderLayer",
    "FeatureEnhancerLayer",
    "FeatureEnhancer",
    "encoder_reference_points",
]

# Image tokens per chunk of the inference FFN (rowwise_in_chunks): each chunk is still a large
# matrix product, and its [chunk, ffn_dim] hidden layer is small next to the [S, ffn_dim] one of
# all the tokens of a large image.
FFN_CHUNK_TOKENS = 2048


class BiAttentionBlock(nn.Module):
    """Layer-normed inputs, bi-directional attention, layer-scaled residuals with drop path."""

    # Initial layer scale of both residuals (the official ``init_values``).
    LAYER_SCALE_INIT = 1e-4

    def __init__(
        self,
        *,
        v_dim: int,
        l_dim: int,
        embed_dim: int,
        num_heads: int,
        dropout: float,
        drop_path: float,
    ):
        """
        Args:
            v_dim, l_dim, embed_dim, num_heads, dropout: as :class:`BiMultiHeadAttention`.
            drop_path: stochastic depth rate of both residual branches.
        """
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(
            v_dim=v_dim, l_dim=l_dim, embed_dim=embed_dim, num_heads=num_heads, dropout=dropout
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_v = nn.Parameter(self.LAYER_SCALE_INIT * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(self.LAYER_SCALE_INIT * torch.ones(l_dim))

    def forward(self, image, text, image_mask, text_mask):
        """Args and returns as :meth:`BiMultiHeadAttention.forward`, the updated features."""
        image = self.layer_norm_v(image)
        text = self.layer_norm_l(text)
        delta_image, delta_text = self.attn(image, text, image_mask, text_mask)
        image = image + self.drop_path(self.gamma_v * delta_image)
        text = text + self.drop_path(self.gamma_l * delta_text)
        return image, text


class TextEnhancerLayer(PostNormFFNLayer):
    """Post-norm text self-attention (sub-sentence masked) and FFN."""

    def __init__(self, *, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self._build_ffn(d_model, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, text, text_pos, self_attention_mask):
        """text, text_pos: [B, L, C]; self_attention_mask: [B, L, L] bool (True = allowed)."""
        query = text + text_pos
        text = self.norm1(
            text + self.dropout(self.self_attn(query, query, text, self_attention_mask[:, None]))
        )
        return self.ffn(text, self.norm2)


class DeformableEncoderLayer(PostNormFFNLayer):
    """Post-norm multi-scale deformable self-attention and FFN on image tokens."""

    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        dropout: float,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim=d_model, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(d_model)
        self._build_ffn(d_model, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, image, image_pos, reference_points, spatial_shapes, level_start_index, image_mask
    ):
        attended = self.self_attn(
            image,
            reference_points,
            image,
            spatial_shapes,
            level_start_index,
            image_mask,
            query_pos=image_pos,
        )
        if self.training and torch.is_grad_enabled():
            residual = image + self.dropout(attended)
            if can_chunk(self.norm1, self.linear1, self.linear2, self.dropout):
                # Neither norm1's output nor the FFN's hidden layer is kept (see chunked_ffn).
                image, ffn_out = chunked_ffn(
                    residual, self.norm1, self.linear1, self.linear2, "relu", FFN_CHUNK_TOKENS
                )
                return self.norm2(image + ffn_out)
            # norm1's output is kept once for the backward, not twice (see layer_norm_linear).
            image, hidden = layer_norm_linear(residual, self.norm1, self.linear1)
            return self.ffn_after_linear1(image, hidden, self.norm2)
        image = self.norm1(image + self.dropout(attended))
        # Inference: the [B, S, ffn_dim] hidden layer, one row per image token, is the
        # enhancer's largest tensor; row chunks reuse one small buffer (see rowwise_in_chunks).
        ffn = functools.partial(self.ffn, norm=self.norm2)
        return rowwise_in_chunks(ffn, image, FFN_CHUNK_TOKENS)


class FeatureEnhancerLayer(nn.Module):
    """One enhancer layer: fusion, then text self-attention, then deformable attention."""

    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        text_heads: int,
        text_ffn_dim: int,
        fusion_dim: int,
        fusion_heads: int,
        dropout: float,
        fusion_drop_path: float,
    ):
        """Args: as :class:`FeatureEnhancer`."""
        super().__init__()
        self.fusion = BiAttentionBlock(
            v_dim=d_model,
            l_dim=d_model,
            embed_dim=fusion_dim,
            num_heads=fusion_heads,
            dropout=dropout,
            drop_path=fusion_drop_path,
        )
        self.text_layer = TextEnhancerLayer(
            d_model=d_model, num_heads=text_heads, ffn_dim=text_ffn_dim, dropout=dropout
        )
        self.image_layer = DeformableEncoderLayer(
            d_model=d_model,
            ffn_dim=ffn_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            dropout=dropout,
        )

    def forward(self, memory, features, image, text, image_pos, reference_points, text_pos):
        """
        Args:
            memory: [B, S, C] image tokens; features: [B, L, C] text features.
            image, text: their layouts and masks (:class:`ImageTokens`, :class:`EncodedText`).
            image_pos: [B, S, C] image positions (with the level embedding).
            reference_points: [B, S, num_levels, 2]; text_pos: [B, L, C].

        Returns:
            the updated (memory, features).
        """
        memory, features = self.fusion(memory, features, image.valid_mask, text.token_mask)
        features = self.text_layer(features, text_pos, text.self_attention_mask)
        memory = self.image_layer(
            memory,
            image_pos,
            reference_points,
            image.spatial_shapes,
            image.level_start_index,
            image.valid_mask,
        )
        return memory, features


def encoder_reference_points(
    level_sizes: Iterable[Sequence], valid_ratios: torch.Tensor
) -> torch.Tensor:
    """
    Centres of the valid feature cells, normalised by each image's valid size.

    Args:
        level_sizes: (H, W) of each padded map: Python ints, or 0-dim tensors while tracing
            (see :func:`~.switches.level_sizes_of`).
        valid_ratios: [B, num_levels, 2] (w, h) valid fraction of each map.

    Returns:
        [B, S, num_levels, 2] reference points (x, y) for every token of every level.
    """
    points = []
    for level, (height, width) in enumerate(level_sizes):
        # Cell centres 0.5, 1.5, ... (the official linspace(0.5, n - 0.5, n); equal, as the
        # step is 1), from an arange that also takes a traced size.
        ys = torch.arange(height, device=valid_ratios.device).to(torch.float32) + 0.5
        xs = torch.arange(width, device=valid_ratios.device).to(torch.float32) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


@FEATURE_ENHANCER_REGISTRY.register()
class FeatureEnhancer(nn.Module):
    """
    A stack of :class:`FeatureEnhancerLayer` plus the level embedding of image tokens.

    Each layer fuses image and text tokens (bi-directional cross-attention), then runs text
    self-attention under the sub-sentence mask and deformable self-attention on the image.
    """

    # Level sizes as tensors rather than Python ints (see modeling.switches); same values.
    traceable = False

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        num_levels: int,
        ffn_dim: int,
        num_heads: int,
        num_points: int,
        text_heads: int,
        text_ffn_dim: int,
        fusion_dim: int,
        fusion_heads: int,
        dropout: float,
        fusion_drop_path: float,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            num_layers: enhancer layers.
            d_model: width C of image and text tokens.
            num_levels: feature levels of the image tokens.
            ffn_dim: hidden width of the image FFN.
            num_heads: heads of the image deformable self-attention.
            num_points: its sampling points per head and level.
            text_heads: heads of the text self-attention.
            text_ffn_dim: hidden width of the text FFN.
            fusion_dim: width of the image-text attention space.
            fusion_heads: heads of the image-text attention.
            dropout: dropout of the attentions and FFNs (training only).
            fusion_drop_path: stochastic depth rate of the image-text fusion residuals.
            use_checkpoint: activation checkpointing of every layer in training (each layer's
                activations are recomputed in the backward instead of kept: less memory, about
                one more forward of the enhancer in time; same values and gradients).
        """
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            FeatureEnhancerLayer(
                d_model=d_model,
                ffn_dim=ffn_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                text_heads=text_heads,
                text_ffn_dim=text_ffn_dim,
                fusion_dim=fusion_dim,
                fusion_heads=fusion_heads,
                dropout=dropout,
                fusion_drop_path=fusion_drop_path,
            )
            for _ in range(num_layers)
        )

    def forward(self, image: ImageTokens, text: EncodedText) -> Tuple[ImageTokens, EncodedText]:
        """
        Args:
            image: the flattened multi-scale image tokens [B, S, C] with their positions,
                valid mask and level layout.
            text: the encoded captions, features [B, L, C].

        Returns:
            image: ``image`` with the enhanced tokens (the memory) [B, S, C].
            text: ``text`` with the enhanced features [B, L, C].
        """
        spatial_shapes = image.spatial_shapes
        if spatial_shapes.shape[0] != self.level_embed.shape[0]:
            raise ValueError(
                f"FeatureEnhancer: the image has {spatial_shapes.shape[0]} feature levels, the "
                f"enhancer was built for num_levels={self.level_embed.shape[0]}"
            )
        memory = image.tokens
        level_ids = torch.repeat_interleave(
            torch.arange(len(spatial_shapes), device=memory.device), spatial_shapes.prod(1)
        )
        image_pos = image.positions + self.level_embed[level_ids][None].to(image.positions.dtype)
        reference_points = encoder_reference_points(
            level_sizes_of(spatial_shapes, self.traceable), image.valid_ratios
        )
        features = text.features
        text_pos = sine_embedding(text.position_ids.float(), num_feats=features.shape[-1])
        checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            args = (memory, features, image, text, image_pos, reference_points, text_pos)
            if checkpointed:
                # Non-reentrant: parameters get gradients even when no input requires them.
                memory, features = checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                memory, features = layer(*args)
        return image.with_tokens(memory), text.with_features(features)
