"""Grounding DINO Swin-T OGC (official ``GroundingDINO_SwinT_OGC.py``), for inference and
evaluation with converted official weights (``groundingdino_swint_ogc.pth``)."""

from .common.models.grounding_dino_swin_t import model

train = dict(
    device="auto",  # CUDA when available, else the CPU (grounding_dino.devices)
    init_checkpoint="",
    init_partial=False,
    output_dir="./output/grounding_dino_swin_t_ogc",
)
