"""Language-guided query selection: the encoder positions that best match the text become
the decoder's anchor boxes."""

from typing import Dict, Iterable, Tuple

import torch
from torch import nn

from .registry import QUERY_SELECTOR_REGISTRY
from .structures import EncodedText, ImageTokens
from .switches import level_sizes_of
from .utils import MLP

__all__ = ["encoder_proposals", "proposals_for_levels", "LanguageGuidedQuerySelector"]


def encoder_proposals(
    memory, image_mask, spatial_shapes, traceable: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    One proposal box per encoder token: its cell centre with size 0.05 * 2^level.

    Args:
        memory: [B, S, C]; image_mask: [B, S] bool, True on valid tokens;
        spatial_shapes: [num_levels, 2];
        traceable: level sizes as tensors (see :func:`~.switches.level_sizes_of`).

    Returns:
        memory [B, S, C] zeroed at padding and at invalid proposals;
        proposals [B, S, 4] unsigmoided (cx, cy, w, h), +inf where invalid.
    """
    return proposals_for_levels(memory, image_mask, level_sizes_of(spatial_shapes, traceable))


def proposals_for_levels(
    memory, image_mask, level_sizes: Iterable[Tuple]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`encoder_proposals` with the level sizes given as (height, width) pairs: Python
    ints, or 0-dim tensors while tracing (the ONNX export's dynamic sizes)."""
    batch = memory.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(level_sizes):
        level_mask = image_mask[:, start : start + height * width].view(batch, height, width)
        valid_h = level_mask[:, :, 0].sum(1)
        valid_w = level_mask[:, 0, :].sum(1)
        # Cell centres 0.5, 1.5, ... (equal to the official linspace(0, n - 1, n) + 0.5).
        ys = torch.arange(height, device=memory.device).to(torch.float32)
        xs = torch.arange(width, device=memory.device).to(torch.float32)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)[None] + 0.5
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2).to(grid.dtype)
        centres = grid / scale
        sizes = torch.full_like(centres, 0.05 * 2.0**level)
        proposals.append(torch.cat([centres, sizes], -1).view(batch, -1, 4))
        start = start + height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = ~image_mask[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


@QUERY_SELECTOR_REGISTRY.register()
class LanguageGuidedQuerySelector(nn.Module):
    """
    Scores every encoder token against the text (max over tokens), keeps the top
    ``num_queries``, and gives the decoder their refined proposal boxes as anchors and a learned
    content embedding as queries (two-stage "standard" with ``embed_init_tgt``).
    """

    # Level sizes as tensors rather than Python ints (see modeling.switches); same values.
    traceable = False

    def __init__(self, *, d_model: int, num_queries: int, head: nn.Module):
        """
        Args:
            d_model: transformer width.
            num_queries: decoder queries (the top-k encoder positions).
            head: the contrastive head scoring the selected proposals,
                ``head(queries [B, Q, C], text [B, L, C], token_mask [B, L]) -> [B, Q,
                max_text_len]`` (the official model: the parameter-free
                :class:`ContrastiveHead`).
        """
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.head = head
        nn.init.normal_(self.tgt_embed.weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(
        self, image: ImageTokens, text: EncodedText
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Args:
            image: the enhanced image tokens (the memory) [B, S, C] and their layout.
            text: the enhanced text, features [B, L, C].

        Returns:
            queries: [B, Q, C] content queries.
            reference: [B, Q, 4] unsigmoided anchor boxes (detached).
            encoder_outputs: dict with ``pred_logits`` [B, Q, max_text_len] and
                ``pred_boxes`` [B, Q, 4] (sigmoid) of the selected proposals.
        """
        memory, image_mask = image.tokens, image.valid_mask
        text_features, text_mask = text.features, text.token_mask
        num_valid = image_mask.sum(1)
        if int(num_valid.min()) < self.num_queries:
            raise ValueError(
                f"An image gives {int(num_valid.min())} feature positions, fewer than "
                f"num_queries={self.num_queries}; use a larger image or fewer queries."
            )
        output_memory, proposals = encoder_proposals(
            memory, image_mask, image.spatial_shapes, self.traceable
        )
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = output_memory @ text_features.transpose(-1, -2)
        scores = logits.masked_fill(~text_mask[:, None, :], float("-inf")).max(-1).values
        # Padding tokens never compete (the references let them; batching must not matter).
        scores = scores.masked_fill(~image_mask, float("-inf"))
        topk = torch.topk(scores, self.num_queries, dim=1).indices
        # The box head is row-wise: run it on the selected tokens only (Q, not S ~ 22k).
        selected = torch.gather(
            output_memory, 1, topk[..., None].expand(-1, -1, output_memory.shape[-1])
        )
        reference = self.bbox_embed(selected) + torch.gather(
            proposals, 1, topk[..., None].expand(-1, -1, 4)
        )
        batch = memory.shape[0]
        queries = self.tgt_embed.weight[None].expand(batch, -1, -1)
        encoder_outputs: Dict[str, torch.Tensor] = {
            "pred_logits": self.head(selected, text_features, text_mask),
            "pred_boxes": reference.sigmoid(),
        }
        return queries, reference.detach(), encoder_outputs
