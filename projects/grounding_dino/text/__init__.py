"""Text side of Grounding DINO: captions, tokenization, sub-sentence masks, positive maps,
phrases of detections and long-prompt chunking."""

from .captions import (
    caption_from_categories,
    check_spans,
    clean_category_name,
    normalize_caption,
    normalize_caption_with_spans,
    swap_left_right,
)
from .chunking import chunk_caption, chunk_categories
from .masks import sub_sentence_masks
from .phrases import phrases_from_token_scores
from .positive_map import positive_map_from_spans, positive_maps_from_spans
from .tokenizer import count_tokens, load_tokenizer, local_bert_dir, special_token_ids, tokenize

__all__ = [
    "clean_category_name",
    "caption_from_categories",
    "check_spans",
    "chunk_caption",
    "chunk_categories",
    "count_tokens",
    "load_tokenizer",
    "local_bert_dir",
    "normalize_caption",
    "normalize_caption_with_spans",
    "phrases_from_token_scores",
    "positive_map_from_spans",
    "positive_maps_from_spans",
    "special_token_ids",
    "sub_sentence_masks",
    "swap_left_right",
    "tokenize",
]
