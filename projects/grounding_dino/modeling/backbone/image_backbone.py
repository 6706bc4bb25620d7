"""Grounding DINO's image side up to the feature enhancer: Swin, input projections, positions.

:class:`SwinImageBackbone` returns the multi-scale maps the encoder consumes, all projected
to ``hidden_dim`` channels: for every returned Swin stage a 1x1 conv + GroupNorm(32), then
extra levels from 3x3 stride-2 convs + GroupNorm(32) (the first on the last Swin map, the
following ones on the previous extra level), each with a padding mask and a sine position
embedding.

Two entry points:

- :meth:`SwinImageBackbone.forward` runs a padded batch like the official code (the mask of
  every level is the pixel mask resized by nearest interpolation). Use it for parity with
  the official and Hugging Face models.
- :meth:`SwinImageBackbone.forward_images` runs a list of images of any sizes, computing
  the backbone and the projections per group of equal-size images and zero-padding the
  results afterwards. Its output for an image does not depend on the other images of the
  batch (the padded batch of the reference code does: Swin sees the padding and GroupNorm
  takes statistics over it).

Parameter names: ``swin.*`` (see :mod:`.swin`) and ``input_proj.<l>.{weight,bias}``,
``input_proj.<l>.norm.{weight,bias}`` (detectron2 ``Conv2d`` with a norm). Converters for
the official and Hugging Face checkpoints are at the bottom of this file.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from ..registry import IMAGE_BACKBONE_REGISTRY
from .position_encoding import PositionEmbeddingSineHW
from .swin import (
    SwinTransformer,
    build_swin_transformer,
    convert_hf_swin_state_dict,
    convert_official_swin_state_dict,
)

__all__ = [
    "SwinImageBackbone",
    "convert_official_input_proj_state_dict",
    "convert_hf_input_proj_state_dict",
    "convert_official_image_backbone_state_dict",
    "convert_hf_image_backbone_state_dict",
]

BackboneOutput = Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]


@IMAGE_BACKBONE_REGISTRY.register()
class SwinImageBackbone(nn.Module):
    """Swin + per-level input projections + sine position embeddings.

    Args:
        swin: a :class:`SwinTransformer`, or the name of a variant in ``SWIN_VARIANTS``
            (built with ``drop_path_rate`` and ``out_indices``).
        hidden_dim: channels of every output level (divisible by 32 for the GroupNorm).
        num_feature_levels: output levels; those beyond the Swin outputs are extra
            stride-2 convs.
        out_indices: Swin stages to return when ``swin`` is a name.
        drop_path_rate: Swin stochastic depth when ``swin`` is a name.
        use_checkpoint: Swin gradient checkpointing when ``swin`` is a name.
        pos_temperature: temperature of the sine embedding in both directions.
    """

    def __init__(
        self,
        swin: Union[str, SwinTransformer] = "swin_T_224_1k",
        *,
        hidden_dim: int = 256,
        num_feature_levels: int = 4,
        out_indices: Sequence[int] = (1, 2, 3),
        drop_path_rate: float = 0.2,
        use_checkpoint: bool = False,
        pos_temperature: float = 20.0,
    ):
        super().__init__()
        if isinstance(swin, str):
            swin = build_swin_transformer(
                swin,
                out_indices=tuple(out_indices),
                drop_path_rate=drop_path_rate,
                use_checkpoint=use_checkpoint,
            )
        if hidden_dim % 32 != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by 32 (GroupNorm)")
        in_channels = list(swin.out_channels)
        if num_feature_levels < len(in_channels):
            raise ValueError(
                f"num_feature_levels ({num_feature_levels}) is smaller than the "
                f"{len(in_channels)} Swin outputs"
            )
        self.swin = swin
        self.hidden_dim = hidden_dim
        self.num_feature_levels = num_feature_levels
        self.num_backbone_levels = len(in_channels)
        projs = [self._proj(c, hidden_dim, kernel_size=1) for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projs.append(self._proj(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1))
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(projs)
        self.position_embedding = PositionEmbeddingSineHW(
            hidden_dim // 2, pos_temperature, pos_temperature, normalize=True
        )

    @staticmethod
    def _proj(in_channels: int, out_channels: int, **conv_kwargs) -> Conv2d:
        conv = Conv2d(in_channels, out_channels, norm=nn.GroupNorm(32, out_channels), **conv_kwargs)
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)
        return conv

    def _project(self, images: torch.Tensor) -> List[torch.Tensor]:
        """[B, 3, H, W] -> list of ``num_feature_levels`` [B, hidden_dim, H_l, W_l] maps."""
        feats = self.swin(images)
        outs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for level in range(self.num_backbone_levels, self.num_feature_levels):
            src = feats[-1] if level == self.num_backbone_levels else outs[-1]
            outs.append(self.input_proj[level](src))
        return outs

    def forward(
        self, images: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None
    ) -> BackboneOutput:
        """Runs a padded batch the way the official code does.

        Args:
            images: [B, 3, H, W] normalised images.
            pixel_mask: [B, H, W] bool, True on valid pixels (None: all valid).

        Returns:
            features: ``num_feature_levels`` maps [B, hidden_dim, H_l, W_l].
            masks: [B, H_l, W_l] bool, True on valid positions (the pixel mask resized by
                nearest interpolation).
            pos: [B, hidden_dim, H_l, W_l] sine position embeddings.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if pixel_mask is None:
            pixel_mask = images.new_ones((images.shape[0],) + images.shape[-2:], dtype=torch.bool)
        elif pixel_mask.shape != (images.shape[0],) + images.shape[-2:]:
            raise ValueError(
                f"pixel_mask shape {tuple(pixel_mask.shape)} does not match images "
                f"{tuple(images.shape)}"
            )
        features = self._project(images)
        mask_float = pixel_mask[None].float()
        masks = [F.interpolate(mask_float, size=f.shape[-2:]).to(torch.bool)[0] for f in features]
        pos = [self.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos

    def forward_images(self, images: Sequence[torch.Tensor]) -> BackboneOutput:
        """Runs images of any sizes so that each result equals the image run alone.

        Images of equal size run together; the maps of each level are then zero-padded to
        the largest size of that level, and the masks mark each image's own extent.

        Args:
            images: list of B normalised [3, H_i, W_i] images.

        Returns:
            as :meth:`forward`, padded at the bottom/right of every level.
        """
        if len(images) == 0:
            raise ValueError("forward_images needs at least one image")
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {i} must be [3, H, W], got shape {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        per_group = [
            (idx, self._project(torch.stack([images[i] for i in idx]))) for idx in groups.values()
        ]
        if len(per_group) == 1 and per_group[0][0] == list(range(len(images))):
            features = per_group[0][1]
            masks = [f.new_ones((f.shape[0],) + f.shape[-2:], dtype=torch.bool) for f in features]
        else:
            features, masks = [], []
            for level in range(self.num_feature_levels):
                h = max(feats[level].shape[-2] for _, feats in per_group)
                w = max(feats[level].shape[-1] for _, feats in per_group)
                ref = per_group[0][1][level]
                feature = ref.new_zeros((len(images), ref.shape[1], h, w))
                mask = torch.zeros((len(images), h, w), dtype=torch.bool, device=ref.device)
                for idx, feats in per_group:
                    hl, wl = feats[level].shape[-2:]
                    index = torch.as_tensor(idx, device=ref.device)
                    feature[index, :, :hl, :wl] = feats[level]
                    mask[index, :hl, :wl] = True
                features.append(feature)
                masks.append(mask)
        pos = [self.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos


def _rename_input_proj(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(\d+)\.([01])\.(weight|bias)$", key)
        if not m:
            raise KeyError(f"Unexpected input projection key {key!r} (expected '<l>.<0|1>.*')")
        level, part, name = m.groups()
        out[f"{level}.{name}" if part == "0" else f"{level}.norm.{name}"] = value
    return out


def convert_official_input_proj_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official keys after ``input_proj.`` (``<l>.0.*`` conv, ``<l>.1.*`` GroupNorm) -> ours
    after ``input_proj.`` (``<l>.*`` conv, ``<l>.norm.*``)."""
    return _rename_input_proj(sd)


def convert_hf_input_proj_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' keys after ``model.input_proj_vision.`` -> ours after ``input_proj.``
    (the same layout as the official one)."""
    return _rename_input_proj(sd)


def _select(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_official_image_backbone_state_dict(
    model_sd: Dict[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """A whole official Grounding DINO state dict (``ckpt["model"]``) -> the state dict of
    :class:`SwinImageBackbone` (keys ``swin.*`` and ``input_proj.*``)."""
    swin = convert_official_swin_state_dict(_select(model_sd, "backbone.0."))
    proj = convert_official_input_proj_state_dict(_select(model_sd, "input_proj."))
    if not swin or not proj:
        raise KeyError("official state dict lacks 'backbone.0.*' or 'input_proj.*' keys")
    out = {f"swin.{k}": v for k, v in swin.items()}
    out.update({f"input_proj.{k}": v for k, v in proj.items()})
    return out


def convert_hf_image_backbone_state_dict(
    model_sd: Dict[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """A whole transformers ``GroundingDinoForObjectDetection`` state dict -> the state dict
    of :class:`SwinImageBackbone` (keys ``swin.*`` and ``input_proj.*``)."""
    swin = convert_hf_swin_state_dict(_select(model_sd, "model.backbone.conv_encoder.model."))
    proj = convert_hf_input_proj_state_dict(_select(model_sd, "model.input_proj_vision."))
    if not swin or not proj:
        raise KeyError(
            "HF state dict lacks 'model.backbone.conv_encoder.model.*' or "
            "'model.input_proj_vision.*' keys"
        )
    out = {f"swin.{k}": v for k, v in swin.items()}
    out.update({f"input_proj.{k}": v for k, v in proj.items()})
    return out
