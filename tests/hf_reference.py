"""Small random transformers Grounding DINO models, saved and converted, for parity tests."""

import os
import subprocess
import sys

import torch

from grounding_dino.testing import tiny_hf_config

__all__ = ["TINY_BERT", "tiny_hf_config", "perturbed_hf_model", "convert_hf_folder"]

# A random BERT with the bert-base-uncased vocabulary (``BertConfig`` kwargs, the text
# encoder's ``bert_config``).
TINY_BERT = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)


def perturbed_hf_model(seed=0, model_type="grounding-dino", **config_overrides):
    """Builds the model and perturbs every parameter, so that no 0/1 init hides a bug
    (``model_type="mm-grounding-dino"``: ``MMGroundingDinoForObjectDetection``, whose per-layer
    heads all become different)."""
    from transformers import GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection

    model_class = {
        "grounding-dino": GroundingDinoForObjectDetection,
        "mm-grounding-dino": MMGroundingDinoForObjectDetection,
    }[model_type]
    torch.manual_seed(seed)
    config = tiny_hf_config(model_type=model_type, **config_overrides)
    model = model_class(config).eval()
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
