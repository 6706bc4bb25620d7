"""Shape-agnostic forwards of detectron2's Swin modules, for tracing with dynamic sizes.

detectron2's Swin (``detectron2.modeling.backbone.swin``) decides padding with Python
``if``\\ s on the feature size and builds the shifted-window mask from ``int(np.ceil(...))``:
traced, both become constants of the export size, and the graph is wrong at any other size.
The functions here compute the same values with tensor arithmetic only (padding by a possibly
zero amount, the window mask from index comparisons), so one graph serves every size. Each
takes the detectron2 module whose ``forward`` it replaces as its first argument;
:class:`~.swin.SwinBackbone` calls them when its ``traceable`` switch is on.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone import swin as d2_swin

__all__ = ["patch_embed_forward", "basic_layer_forward"]


def _window_reverse(windows: torch.Tensor, window_size: int, height, width) -> torch.Tensor:
    """[B*nW, ws, ws, C] windows -> [B, H, W, C] (batch inferred, not computed in Python)."""
    x = windows.view(
        -1, height // window_size, width // window_size, window_size, window_size, windows.shape[-1]
    )
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, windows.shape[-1])


def patch_embed_forward(embed: d2_swin.PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed.forward``: pads H and W up to the patch size by a (maybe zero) amount."""
    height, width = x.shape[2], x.shape[3]
    ph, pw = embed.patch_size
    x = F.pad(x, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))
    x = embed.proj(x)
    if embed.norm is not None:
        wh, ww = x.shape[2], x.shape[3]
        x = embed.norm(x.flatten(2).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, embed.embed_dim, wh, ww)
    return x


def _patch_merging_forward(
    merging: d2_swin.PatchMerging, x: torch.Tensor, height, width
) -> torch.Tensor:
    """``PatchMerging.forward``: pads odd sizes by ``size % 2`` (zero when even)."""
    batch, _, channels = x.shape
    x = x.view(batch, height, width, channels)
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat(
        [x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1
    )
    x = x.view(batch, -1, 4 * channels)
    return merging.reduction(merging.norm(x))


def _block_forward(
    block: d2_swin.SwinTransformerBlock, x: torch.Tensor, height, width, mask_matrix: torch.Tensor
) -> torch.Tensor:
    """``SwinTransformerBlock.forward`` (at size ``height`` x ``width``, which detectron2
    reads from ``block.H``, ``block.W``) with padding and cropping that do not branch."""
    batch, _, channels = x.shape
    size, shift = block.window_size, block.shift_size
    shortcut = x
    x = block.norm1(x).view(batch, height, width, channels)
    x = F.pad(x, (0, 0, 0, (size - width % size) % size, 0, (size - height % size) % size))
    padded_h, padded_w = x.shape[1], x.shape[2]
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = d2_swin.window_partition(x, size).view(-1, size * size, channels)
    windows = block.attn(windows, mask=mask_matrix if shift > 0 else None)
    x = _window_reverse(windows.view(-1, size, size, channels), size, padded_h, padded_w)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = x[:, :height, :width, :].reshape(batch, height * width, channels)
    x = shortcut + block.drop_path(x)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def _shift_regions(length, size: int, shift: int) -> torch.Tensor:
    """Region index (0, 1, 2) of each padded row of length ``length``: detectron2's slices
    ``[0, -size)``, ``[-size, -shift)``, ``[-shift, end)``."""
    index = torch.arange(length)
    return (index >= length - size).long() + (index >= length - shift).long()


def basic_layer_forward(layer: d2_swin.BasicLayer, x: torch.Tensor, height, width) -> Tuple:
    """``BasicLayer.forward`` (its blocks and patch merging included) with the shifted-window
    mask built from index comparisons. Returns what detectron2's does: ``(out, H, W, down,
    H_down, W_down)``."""
    size, shift = layer.window_size, layer.shift_size
    padded_h = (height + size - 1) // size * size
    padded_w = (width + size - 1) // size * size
    regions = (
        _shift_regions(padded_h, size, shift)[:, None] * 3
        + _shift_regions(padded_w, size, shift)[None, :]
    )
    image_mask = regions.to(device=x.device, dtype=torch.float32)[None, :, :, None]
    mask_windows = d2_swin.window_partition(image_mask, size).view(-1, size * size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
    for block in layer.blocks:
        x = _block_forward(block, x, height, width, attn_mask)
    if layer.downsample is None:
        return x, height, width, x, height, width
    down = _patch_merging_forward(layer.downsample, x, height, width)
    return x, height, width, down, (height + 1) // 2, (width + 1) // 2
