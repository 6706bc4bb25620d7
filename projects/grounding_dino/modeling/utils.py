"""Small building blocks shared by the transformer parts."""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "linear_weight",
    "rowwise_in_chunks",
    "inverse_sigmoid",
    "sine_embedding",
    "box_sine_embedding",
]


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """
    The [out, in] weight that ``layer(x)`` applies, for code that reads a Linear's weight
    directly (the folded image-text attention, the deformable offsets) instead of calling it.

    A plain ``nn.Linear`` gives its ``weight``. A Linear wrapped by a ``peft`` LoRA adapter
    (``grounding_dino.finetune.lora``) keeps the base weight in ``base_layer.weight`` and adds
    ``get_delta_weight(name)`` per active adapter unless the adapter is merged or disabled; this
    returns that sum, so the adapter acts on every path, called or read. Duck-typed: the model
    does not import peft.
    """
    base = getattr(layer, "base_layer", None)
    if base is None or not hasattr(layer, "get_delta_weight"):
        return layer.weight
    weight = base.weight
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return weight
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + layer.get_delta_weight(name)
    return weight


class MLP(nn.Module):
    """A stack of Linear layers with ReLU in between (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        """
        Args:
            input_dim, hidden_dim, output_dim: widths of the input, hidden and output layers.
            num_layers: number of Linear layers (``layers.{i}`` in the checkpoints).
        """
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def rowwise_in_chunks(fn, x: torch.Tensor, chunk: int, *more: torch.Tensor) -> torch.Tensor:
    """
    ``fn(x)`` computed on chunks of ``chunk`` rows of dimension 1, for an ``fn`` that treats
    every row on its own (linear layers, activations, layer norms): equal to ``fn(x)``.

    Wide hidden layers of many tokens (an FFN's [B, S, 2048]) are large fresh allocations,
    whose first touch costs page faults on the CPU; chunks of a few MB are recycled by the
    allocator and stay in cache. On other devices (CUDA's caching allocator has no such cost;
    not measured) and while tracing (ONNX export: the graph keeps a dynamic number of rows)
    ``fn(x)`` runs whole.

    Args:
        fn: [B, n, C] -> [B, n, C_out], row-wise; with ``more``, ``fn(x, *more)`` on the same
            rows of every tensor.
        x: [B, S, C].
        chunk: rows per chunk (>= 1).
        more: further [B, S, ...] inputs of ``fn``.

    Returns:
        [B, S, C_out].
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or x.device.type != "cpu":
        return fn(x, *more)
    if x.shape[1] <= chunk:
        return fn(x, *more)
    rows = x.shape[1]
    first = fn(x[:, :chunk], *(t[:, :chunk] for t in more))
    out = first.new_empty((x.shape[0], rows) + first.shape[2:])
    out[:, :chunk] = first
    for start in range(chunk, rows, chunk):
        part = slice(start, start + chunk)
        out[:, part] = fn(x[:, part], *(t[:, part] for t in more))
    return out


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The logit of ``x`` with ``x`` clamped to [0, 1] and both terms to >= ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _inverse_frequencies(num_feats: int, temperature: float, device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def sine_embedding(values: torch.Tensor, num_feats: int, temperature: float = 10000):
    """
    Sine/cosine embedding of scalars, interleaved as (sin, cos) pairs.

    Args:
        values: [...] any shape; each value is scaled by 2*pi first.
        num_feats: channels of the embedding.
        temperature: the wavelength base (10000 in DETR, DAB, DINO and Grounding DINO).

    Returns:
        [..., num_feats]
    """
    scaled = (
        values[..., None]
        * (2 * math.pi)
        / _inverse_frequencies(num_feats, temperature, values.device)
    )
    return torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int) -> torch.Tensor:
    """
    The decoder's query position embedding of 4-d reference boxes.

    Args:
        boxes: [..., 4] normalised (cx, cy, w, h).
        num_feats: channels per coordinate.

    Returns:
        [..., 4 * num_feats] ordered (y, x, w, h) as in DAB/DINO.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([sine_embedding(v, num_feats) for v in (cy, cx, w, h)], dim=-1)
