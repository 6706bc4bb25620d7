"""The feature enhancer: early fusion of image and text features (replaces DINO's encoder).

Each layer runs (a) bi-directional image<->text cross-attention, (b) text self-attention
under the sub-sentence mask and (c) multi-scale deformable self-attention on image tokens.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .attention import MultiheadAttention
from .deformable_attention import MultiScaleDeformableAttention
from .registry import FEATURE_ENHANCER_REGISTRY
from .utils import sine_embedding

__all__ = [
    "BiMultiHeadAttention",
    "BiAttentionBlock",
    "TextEnhancerLayer",
    "DeformableEncoderLayer",
    "FeatureEnhancerLayer",
    "FeatureEnhancer",
    "encoder_reference_points",
]


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one matrix of logits."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout=0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for layer in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.embed_dim)

    def forward(self, image, text, image_mask, text_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image: [B, S, Cv]; text: [B, L, Cl].
            image_mask: [B, S] bool, True on valid image tokens.
            text_mask: [B, L] bool, True on valid text tokens.

        Returns:
            delta_image [B, S, Cv], delta_text [B, L, Cl].
        """
        if self.training and self.dropout > 0:
            return self._forward_projected(image, text, image_mask, text_mask)
        return self._forward_folded(image, text, image_mask, text_mask)

    def _forward_folded(self, image, text, image_mask, text_mask):
        """
        The same attention with every image-side projection folded into the text side.

        There are S ~ 22k image tokens and L ~ 10-30 text tokens, and the projections to
        ``embed_dim`` (1024) on the image side cost 3 * S * Cv * 1024 multiply-adds per layer.
        Per head h (projection rows ``W_h``, biases ``b_h``, scale s):

        - logits ``(x Wv_h^T + bv_h) k_h^T s = x (Wv_h^T k_h^T s) + (k_h bv_h s)``: the image
          tokens x [S, Cv] meet a [Cv, L] matrix instead of being projected;
        - image output ``out_v(sum_h P_h v_h)``: ``sum_h P_h (v_h Wout_h^T) + b_out`` with
          P_h [S, L] the softmax over text tokens, so the [L, Cv] products are all that is
          projected;
        - text output ``Q_h (x Wvv_h^T + bvv_h) = (Q_h x) Wvv_h^T + bvv_h`` with Q_h [L, S]
          the softmax over image tokens (its rows sum to 1).

        The image side then costs O(S * H * L * Cv) instead of O(S * Cv * embed_dim). The
        results equal :meth:`_forward_projected` up to fp32 rounding.
        """
        batch, length, _ = text.shape
        heads, dim = self.num_heads, self.head_dim
        scale = dim**-0.5
        key = self.l_proj(text).view(batch, length, heads, dim)  # [B, L, H, d]
        weight_v = self.v_proj.weight.view(heads, dim, -1)  # [H, d, Cv]
        # [B, Cv, H*L] and [B, 1, H*L]: logits = image @ key_in_image + key_bias
        key_in_image = torch.einsum("hdc,blhd->bchl", weight_v, key).flatten(2) * scale
        key_bias = torch.einsum("hd,blhd->bhl", self.v_proj.bias.view(heads, dim), key)
        key_bias = key_bias.reshape(batch, 1, heads * length) * scale
        logits = torch.baddbmm(key_bias, image, key_in_image)  # [B, S, H*L]

        # Image -> text: softmax over the text tokens of each head.
        text_logits = logits.view(batch, -1, heads, length)
        probs = text_logits.masked_fill(~text_mask[:, None, None, :], float("-inf")).softmax(-1)
        text_values = self.values_l_proj(text).view(batch, length, heads, dim)
        weight_out = self.out_v_proj.weight.view(-1, heads, dim)  # [Cv, H, d]
        projected_values = torch.einsum("blhd,chd->bhlc", text_values, weight_out)
        delta_image = torch.baddbmm(
            self.out_v_proj.bias, probs.flatten(2), projected_values.flatten(1, 2)
        )

        # Text -> image: softmax over the valid image tokens.
        image_logits = logits.masked_fill(~image_mask[:, :, None], float("-inf"))
        image_probs = image_logits.softmax(1).view(batch, -1, heads, length)
        pooled = torch.einsum("bshl,bsc->bhlc", image_probs, image)  # [B, H, L, Cv]
        weight_vv = self.values_v_proj.weight.view(heads, dim, -1)  # [H, d, Cv]
        text_out = torch.einsum("bhlc,hdc->blhd", pooled, weight_vv)
        text_out = text_out + self.values_v_proj.bias.view(heads, dim)
        delta_text = self.out_l_proj(text_out.reshape(batch, length, self.embed_dim))
        return delta_image, delta_text

    def _forward_projected(self, image, text, image_mask, text_mask):
        """The attention as written in the paper (used in training with dropout)."""
        query = self._heads(self.v_proj(image))
        key = self._heads(self.l_proj(text))
        image_values = self._heads(self.values_v_proj(image))
        text_values = self._heads(self.values_l_proj(text))
        dropout = self.dropout if self.training else 0.0
        # Softmax is shift-invariant, so the reference's max-subtraction and +-50000 clamps
        # change nothing for finite fp32 logits; SDPA computes the same two attentions.
        image_out = F.scaled_dot_product_attention(
            query, key, text_values, attn_mask=text_mask[:, None, None, :], dropout_p=dropout
        )
        text_out = F.scaled_dot_product_attention(
            key,
            query,
            image_values,
            attn_mask=image_mask[:, None, None, :],
            dropout_p=dropout,
            scale=self.head_dim**-0.5,
        )
        return self.out_v_proj(self._merge(image_out)), self.out_l_proj(self._merge(text_out))


class BiAttentionBlock(nn.Module):
    """Layer-normed inputs, bi-directional attention, layer-scaled residuals with drop path."""

    def __init__(
        self,
        v_dim: int = 256,
        l_dim: int = 256,
        embed_dim: int = 1024,
        num_heads: int = 4,
        dropout: float = 0.0,
        drop_path: float = 0.1,
        init_values: float = 1e-4,
    ):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_v = nn.Parameter(init_values * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_values * torch.ones(l_dim))

    def forward(self, image, text, image_mask, text_mask):
        image = self.layer_norm_v(image)
        text = self.layer_norm_l(text)
        delta_image, delta_text = self.attn(image, text, image_mask, text_mask)
        image = image + self.drop_path(self.gamma_v * delta_image)
        text = text + self.drop_path(self.gamma_l * delta_text)
        return image, text


class TextEnhancerLayer(nn.Module):
    """Post-norm text self-attention (sub-sentence masked) and FFN."""

    def __init__(self, d_model=256, num_heads=4, ffn_dim=1024, dropout=0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text, text_pos, self_attention_mask):
        """text, text_pos: [B, L, C]; self_attention_mask: [B, L, L] bool (True = allowed)."""
        query = text + text_pos
        text = self.norm1(
            text + self.dropout(self.self_attn(query, query, text, self_attention_mask[:, None]))
        )
        ffn = self.linear2(self.dropout(F.relu(self.linear1(text), inplace=True)))
        return self.norm2(text + self.dropout(ffn))


class DeformableEncoderLayer(nn.Module):
    """Post-norm multi-scale deformable self-attention and FFN on image tokens."""

    def __init__(
        self, d_model=256, ffn_dim=2048, num_heads=8, num_levels=4, num_points=4, dropout=0.0
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, image, image_pos, reference_points, spatial_shapes, level_start_index, image_mask
    ):
        attended = self.self_attn(
            image + image_pos,
            reference_points,
            image,
            spatial_shapes,
            level_start_index,
            image_mask,
        )
        image = self.norm1(image + self.dropout(attended))
        # In place: the [B, S, ffn_dim] hidden layer is the largest tensor of the enhancer.
        ffn = self.linear2(self.dropout(F.relu(self.linear1(image), inplace=True)))
        return self.norm2(image + self.dropout(ffn))


class FeatureEnhancerLayer(nn.Module):
    """One enhancer layer: fusion, then text self-attention, then deformable attention."""

    def __init__(
        self,
        d_model=256,
        ffn_dim=2048,
        num_heads=8,
        num_levels=4,
        num_points=4,
        text_heads=4,
        text_ffn_dim=1024,
        fusion_dim=1024,
        fusion_heads=4,
        dropout=0.0,
        fusion_drop_path=0.1,
    ):
        super().__init__()
        self.fusion = BiAttentionBlock(
            d_model, d_model, fusion_dim, fusion_heads, dropout, fusion_drop_path
        )
        self.text_layer = TextEnhancerLayer(d_model, text_heads, text_ffn_dim, dropout)
        self.image_layer = DeformableEncoderLayer(
            d_model, ffn_dim, num_heads, num_levels, num_points, dropout
        )


def encoder_reference_points(spatial_shapes, valid_ratios) -> torch.Tensor:
    """
    Centres of the valid feature cells, normalised by each image's valid size.

    Args:
        spatial_shapes: [num_levels, 2] (H, W) of the padded maps.
        valid_ratios: [B, num_levels, 2] (w, h) valid fraction of each map.

    Returns:
        [B, S, num_levels, 2] reference points (x, y) for every token of every level.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ys = torch.linspace(0.5, height - 0.5, height, device=valid_ratios.device)
        xs = torch.linspace(0.5, width - 0.5, width, device=valid_ratios.device)
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


@FEATURE_ENHANCER_REGISTRY.register()
class FeatureEnhancer(nn.Module):
    """A stack of :class:`FeatureEnhancerLayer` plus the level embedding of image tokens."""

    def __init__(self, num_layers=6, d_model=256, num_levels=4, **layer_kwargs):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            FeatureEnhancerLayer(d_model=d_model, num_levels=num_levels, **layer_kwargs)
            for _ in range(num_layers)
        )

    def forward(
        self, image, image_pos, image_mask, spatial_shapes, level_start_index, valid_ratios, text
    ):
        """
        Args:
            image: [B, S, C] flattened multi-scale image tokens.
            image_pos: [B, S, C] their sine position embedding (without level embedding).
            image_mask: [B, S] bool, True on valid tokens.
            spatial_shapes: [num_levels, 2]; level_start_index: [num_levels].
            valid_ratios: [B, num_levels, 2].
            text: :class:`EncodedText` with features [B, L, C].

        Returns:
            memory [B, S, C], text features [B, L, C].
        """
        level_ids = torch.repeat_interleave(
            torch.arange(len(spatial_shapes), device=image.device),
            spatial_shapes.prod(1),
        )
        image_pos = image_pos + self.level_embed[level_ids][None].to(image_pos.dtype)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        text_features = text.features
        text_pos = sine_embedding(text.position_ids.float(), num_feats=text_features.shape[-1])
        for layer in self.layers:
            image, text_features = layer.fusion(image, text_features, image_mask, text.token_mask)
            text_features = layer.text_layer(text_features, text_pos, text.self_attention_mask)
            image = layer.image_layer(
                image, image_pos, reference_points, spatial_shapes, level_start_index, image_mask
            )
        return image, text_features
