"""Checkpoint conversion from the official and the Hugging Face Grounding DINO."""

from .checkpoint import load_checkpoint_file
from .keys import convert_hf_state_dict, convert_official_state_dict

__all__ = ["convert_official_state_dict", "convert_hf_state_dict", "load_checkpoint_file"]
