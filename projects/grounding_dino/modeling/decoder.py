"""The cross-modality decoder: queries attend to each other, to the text and to the image,
and refine their boxes layer by layer."""

import functools
from typing import List, Optional, Tuple

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

from .attention import MultiheadAttention
from .deformable_attention import MultiScaleDeformableAttention
from .ffn import PostNormFFNLayer
from .registry import DECODER_REGISTRY
from .structures import EncodedText, ImageTokens
from .utils import MLP, box_sine_embedding, inverse_sigmoid

__all__ = ["CrossModalityDecoderLayer", "CrossModalityDecoder"]


class CrossModalityDecoderLayer(PostNormFFNLayer):
    """Self-attention -> text cross-attention -> deformable image cross-attention -> FFN,
    each followed by a residual and LayerNorm."""

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_levels: int,
        num_points: int,
        dropout: float,
    ):
        """Args: as :class:`CrossModalityDecoder`."""
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ca_text = MultiheadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self.catext_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=d_model, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(d_model)
        self._build_ffn(d_model, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        queries,
        query_pos,
        reference_points,
        memory,
        memory_mask,
        spatial_shapes,
        level_start_index,
        text,
        text_mask,
        self_attention_mask=None,
    ):
        """
        Args:
            queries, query_pos: [B, Q, C].
            reference_points: [B, Q, num_levels, 4] reference boxes scaled to valid ratios.
            memory: [B, S, C]; memory_mask: [B, S] bool valid.
            spatial_shapes: [num_levels, 2]; level_start_index: [num_levels].
            text: [B, L, C]; text_mask: [B, L] bool valid.
            self_attention_mask: optional [Q, Q] bool, True where query i may see query j.

        Returns:
            [B, Q, C]
        """
        q = queries + query_pos
        allowed = None if self_attention_mask is None else self_attention_mask[None, None]
        queries = self.norm2(queries + self.dropout(self.self_attn(q, q, queries, allowed)))
        attended = self.ca_text(queries + query_pos, text, text, text_mask[:, None, None, :])
        queries = self.catext_norm(queries + self.dropout(attended))
        attended = self.cross_attn(
            queries + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_mask,
        )
        queries = self.norm1(queries + self.dropout(attended))
        return self.ffn(queries, self.norm3)


@DECODER_REGISTRY.register()
class CrossModalityDecoder(nn.Module):
    """
    A stack of :class:`CrossModalityDecoderLayer` with iterative box refinement by one box
    head shared across layers (the official model) or one box head per layer
    (MM-Grounding-DINO, LLMDet), and a query position embedding from the boxes' sine embedding.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_levels: int,
        num_points: int,
        dropout: float,
        per_layer_box_heads: bool = False,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            num_layers: decoder layers.
            d_model: width C of queries, image and text tokens.
            num_heads: heads of the self-, text and image (deformable) attentions.
            ffn_dim: hidden width of the FFN.
            num_levels: feature levels of the image tokens.
            num_points: deformable sampling points per head and level.
            dropout: dropout of the attentions and FFN (training only).
            per_layer_box_heads: False: one box head ``bbox_embed`` shared by the layers;
                True: ``bbox_embed`` is a list with one head per layer.
            use_checkpoint: activation checkpointing of every layer in training (recomputed in
                the backward: less memory, same values and gradients).
        """
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.layers = nn.ModuleList(
            CrossModalityDecoderLayer(
                d_model=d_model,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                num_levels=num_levels,
                num_points=num_points,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        box_heads = [MLP(d_model, d_model, 4, 3) for _ in range(num_layers)]
        for box_head in box_heads:
            nn.init.zeros_(box_head.layers[-1].weight)
            nn.init.zeros_(box_head.layers[-1].bias)
        self.bbox_embed = nn.ModuleList(box_heads) if per_layer_box_heads else box_heads[0]
        self.d_model = d_model

    def forward(
        self,
        queries: torch.Tensor,
        reference: torch.Tensor,
        image: ImageTokens,
        text: EncodedText,
        self_attention_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            queries: [B, Q, C] content queries.
            reference: [B, Q, 4] unsigmoided anchor boxes (cx, cy, w, h).
            image: the enhanced image tokens (the memory) [B, S, C] and their layout.
            text: the enhanced text, features [B, L, C].
            self_attention_mask: optional [Q, Q] bool, True where query i may attend to query
                j (the denoising groups); None lets every query see every other.

        Returns:
            hidden: list over layers of [B, Q, C] (after the final LayerNorm).
            boxes: list over layers of [B, Q, 4] sigmoid (cx, cy, w, h) predictions.
        """
        num_queries = queries.shape[1]
        if self_attention_mask is not None and (
            self_attention_mask.shape != (num_queries, num_queries)
            or self_attention_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"CrossModalityDecoder: self_attention_mask must be a [{num_queries}, "
                f"{num_queries}] bool tensor (True = allowed), got "
                f"{tuple(self_attention_mask.shape)} {self_attention_mask.dtype}"
            )
        reference_points = reference.sigmoid()
        ratios = torch.cat([image.valid_ratios, image.valid_ratios], -1)[:, None]
        hidden, boxes = [], []
        shared = not isinstance(self.bbox_embed, nn.ModuleList)
        checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            box_head = self.bbox_embed if shared else self.bbox_embed[index]
            points_input = reference_points[:, :, None] * ratios
            # The references embed the box scaled by the level-0 valid ratio, which makes a
            # padded image's queries depend on the batch; the box itself is the same for a
            # lone image (ratio 1) and keeps batches equal to one-by-one calls.
            query_pos = self.ref_point_head(
                box_sine_embedding(reference_points, num_feats=self.d_model // 2)
            )
            # Non-reentrant checkpointing: parameters get gradients whatever the inputs.
            run = functools.partial(checkpoint.checkpoint, layer, use_reentrant=False)
            queries = (run if checkpointed else layer)(
                queries,
                query_pos,
                points_input,
                image.tokens,
                image.valid_mask,
                image.spatial_shapes,
                image.level_start_index,
                text.features,
                text.token_mask,
                self_attention_mask,
            )
            anchor = inverse_sigmoid(reference_points)
            normed = self.norm(queries)
            hidden.append(normed)
            # As the references: predictions come from the normed queries, while the next
            # layer's anchors come from the raw ones.
            boxes.append((box_head(normed) + anchor).sigmoid())
            reference_points = (box_head(queries) + anchor).sigmoid().detach()
        return hidden, boxes
