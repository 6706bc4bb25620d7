"""Test configuration: CPU only, offline (nothing may reach a model hub)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm_dir():
    """Local folder of the pretrained MiniLM BERT (bert-base-uncased vocabulary)."""
    from grounding_dino.text.tokenizer import local_bert_dir

    return local_bert_dir()
