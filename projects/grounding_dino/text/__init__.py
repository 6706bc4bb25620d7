"""Text side of Grounding DINO: captions, the prompt encoder (tokenisation, prompt runs,
sub-sentence masks, positive maps, phrases of detections) and long-prompt chunking."""

from .captions import (
    caption_from_categories,
    check_spans,
    clean_category_name,
    normalize_caption,
    normalize_caption_with_spans,
    swap_left_right,
)
from .chunking import category_token_costs, chunk_caption, chunk_categories
from .masks import sub_sentence_masks
from .phrases import phrases_from_token_scores
from .positive_map import positive_map_from_spans, positive_maps_from_spans
from .prompt import SPECIAL_TOKENS, PromptEncoder, PromptRun, TokenizedText
from .tokenizer import count_tokens, load_tokenizer, local_bert_dir

__all__ = [
    "SPECIAL_TOKENS",
    "PromptEncoder",
    "PromptRun",
    "TokenizedText",
    "caption_from_categories",
    "category_token_costs",
    "check_spans",
    "chunk_caption",
    "chunk_categories",
    "clean_category_name",
    "count_tokens",
    "load_tokenizer",
    "local_bert_dir",
    "normalize_caption",
    "normalize_caption_with_spans",
    "phrases_from_token_scores",
    "positive_map_from_spans",
    "positive_maps_from_spans",
    "sub_sentence_masks",
    "swap_left_right",
]
