"""Shape-agnostic forwards of detectron2's Swin modules, used while tracing for ONNX export.

detectron2's Swin (``detectron2.modeling.backbone.swin``) decides padding with Python
``if``\\ s on the feature size and builds the shifted-window mask from ``int(np.ceil(...))``:
traced, both become constants of the export size, and the graph is wrong at any other size.
The forwards here compute the same values with tensor arithmetic only (padding by a possibly
zero amount, the window mask from index comparisons), so one graph serves every size. They
are installed on the instances by :func:`swin_export_forwards` and removed afterwards; the
model's own code is unchanged.
"""

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone import swin as d2_swin
from torch import nn

__all__ = ["swin_export_forwards"]


def _window_reverse(windows: torch.Tensor, window_size: int, height, width) -> torch.Tensor:
    """[B*nW, ws, ws, C] windows -> [B, H, W, C] (batch inferred, not computed in Python)."""
    x = windows.view(
        -1, height // window_size, width // window_size, window_size, window_size, windows.shape[-1]
    )
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, windows.shape[-1])


def _patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed.forward``: pads H and W up to the patch size by a (maybe zero) amount."""
    height, width = x.shape[2], x.shape[3]
    ph, pw = self.patch_size
    x = F.pad(x, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))
    x = self.proj(x)
    if self.norm is not None:
        wh, ww = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, self.embed_dim, wh, ww)
    return x


def _patch_merging_forward(self, x: torch.Tensor, height, width) -> torch.Tensor:
    """``PatchMerging.forward``: pads odd sizes by ``size % 2`` (zero when even)."""
    batch, _, channels = x.shape
    x = x.view(batch, height, width, channels)
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat(
        [x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1
    )
    x = x.view(batch, -1, 4 * channels)
    return self.reduction(self.norm(x))


def _block_forward(self, x: torch.Tensor, mask_matrix: torch.Tensor) -> torch.Tensor:
    """``SwinTransformerBlock.forward`` with padding and cropping that do not branch."""
    batch, _, channels = x.shape
    height, width, size, shift = self.H, self.W, self.window_size, self.shift_size
    shortcut = x
    x = self.norm1(x).view(batch, height, width, channels)
    x = F.pad(x, (0, 0, 0, (size - width % size) % size, 0, (size - height % size) % size))
    padded_h, padded_w = x.shape[1], x.shape[2]
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = d2_swin.window_partition(x, size).view(-1, size * size, channels)
    windows = self.attn(windows, mask=mask_matrix if shift > 0 else None)
    x = _window_reverse(windows.view(-1, size, size, channels), size, padded_h, padded_w)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = x[:, :height, :width, :].reshape(batch, height * width, channels)
    x = shortcut + self.drop_path(x)
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _shift_regions(length, size: int, shift: int) -> torch.Tensor:
    """Region index (0, 1, 2) of each padded row of length ``length``: detectron2's slices
    ``[0, -size)``, ``[-size, -shift)``, ``[-shift, end)``."""
    index = torch.arange(length)
    return (index >= length - size).long() + (index >= length - shift).long()


def _basic_layer_forward(self, x: torch.Tensor, height, width):
    """``BasicLayer.forward`` with the shifted-window mask built from index comparisons."""
    size, shift = self.window_size, self.shift_size
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
    for block in self.blocks:
        block.H, block.W = height, width
        x = block(x, attn_mask)
    if self.downsample is None:
        return x, height, width, x, height, width
    down = self.downsample(x, height, width)
    return x, height, width, down, (height + 1) // 2, (width + 1) // 2


_FORWARDS = (
    (d2_swin.PatchEmbed, _patch_embed_forward),
    (d2_swin.PatchMerging, _patch_merging_forward),
    (d2_swin.SwinTransformerBlock, _block_forward),
    (d2_swin.BasicLayer, _basic_layer_forward),
)


@contextlib.contextmanager
def swin_export_forwards(model: nn.Module) -> Iterator[int]:
    """
    Installs the shape-agnostic forwards on every detectron2 Swin module of ``model`` (yields
    how many), and removes them afterwards, also when the body raises.
    """
    patched = []
    try:
        for module in model.modules():
            for cls, forward in _FORWARDS:
                if type(module) is cls:
                    module.forward = types.MethodType(forward, module)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
