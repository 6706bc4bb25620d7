"""Small random transformers Grounding DINO models, saved and converted, for parity tests."""

import os
import subprocess
import sys

import torch

__all__ = ["tiny_hf_config", "perturbed_hf_model", "convert_hf_folder"]


def tiny_hf_config(d_model=64, num_queries=30, **overrides):
    """A small but complete transformers GroundingDinoConfig (Swin + BERT)."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=32,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        out_indices=[2, 3, 4],
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=30522,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=512,
    )
    args = dict(
        backbone_config=backbone,
        text_config=text,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=num_queries,
        fusion_dropout=0.0,
        fusion_droppath=0.0,
    )
    args.update(overrides)
    return GroundingDinoConfig(**args)


def perturbed_hf_model(seed=0, **config_overrides):
    """Builds the model and perturbs every parameter, so that no 0/1 init hides a bug."""
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_hf_config(**config_overrides)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * 0.05 + 0.01)
    return model


def convert_hf_folder(folder, out_dir, tokenizer_dir):
    """Runs the project's converter CLI; returns its stdout."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grounding_dino.convert",
            "hf",
            str(folder),
            str(out_dir),
            "--tokenizer",
            tokenizer_dir,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        raise AssertionError(
            f"converter failed ({result.returncode}):\n{result.stdout}\n" f"{result.stderr}"
        )
    return result.stdout
