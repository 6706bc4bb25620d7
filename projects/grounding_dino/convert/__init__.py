"""Checkpoint conversion: the official, Hugging Face and mmdetection Grounding DINO, ImageNet
Swin (official release, timm) and closed-set DINO (official, detrex) weights -> this project's
keys; :func:`load_init_checkpoint` loads any of them (converted or not) into a built model."""

from .checkpoint import load_checkpoint_file, load_training_checkpoint
from .keys import convert_hf_state_dict, convert_official_state_dict
from .partial import load_init_checkpoint, read_init_checkpoint
from .sources import convert_state_dict, detect_source

__all__ = [
    "convert_official_state_dict",
    "convert_hf_state_dict",
    "convert_state_dict",
    "detect_source",
    "load_checkpoint_file",
    "load_init_checkpoint",
    "load_training_checkpoint",
    "read_init_checkpoint",
]
