"""Long prompts: split category lists and captions into pieces that fit the text length."""

import re
from typing import Callable, List, Optional, Sequence, Tuple

from .captions import caption_from_categories
from .tokenizer import count_tokens

__all__ = [
    "category_token_costs",
    "check_classes_per_prompt",
    "chunk_categories",
    "chunk_caption",
]

# A phrase: text up to and including a run of ".", or the text after the last one.
_PHRASE = re.compile(r"[^.]*\.+|[^.]+$", re.DOTALL)


def _piece_lengths(tokenizer, texts: Sequence[str]) -> List[int]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def _greedy(
    lengths: Sequence[int],
    budget: int,
    fits: Callable[[int, int], bool],
    max_items: Optional[int] = None,
) -> List[Tuple[int, int]]:
    """Groups consecutive items [start, end) whose summed length fits ``budget`` (and of at
    most ``max_items`` items); each group is checked with ``fits`` (the exact count) and
    shortened while it does not fit."""
    groups = []
    start = 0
    limit = len(lengths) if max_items is None else max_items
    while start < len(lengths):
        end, total = start, 0
        while end < len(lengths) and end - start < limit and total + lengths[end] <= budget:
            total += lengths[end]
            end += 1
        end = max(end, start + 1)
        while end > start + 1 and not fits(start, end):
            end -= 1
        groups.append((start, end))
        start = end
    return groups


def check_classes_per_prompt(classes_per_prompt) -> None:
    """ValueError unless ``classes_per_prompt`` is None or a positive int."""
    if classes_per_prompt is None:
        return
    if isinstance(classes_per_prompt, bool) or not isinstance(classes_per_prompt, int):
        raise ValueError(f"classes_per_prompt must be an int or None, got {classes_per_prompt!r}")
    if classes_per_prompt < 1:
        raise ValueError(f"classes_per_prompt must be at least 1, got {classes_per_prompt}")


def category_token_costs(names: Sequence[str], tokenizer) -> List[int]:
    """
    Tokens each category adds to a prompt of :func:`caption_from_categories`: its words and
    the " ." that closes it.
    """
    words = [" ".join(name.lower().split()) for name in names]
    return [n + 1 for n in _piece_lengths(tokenizer, words)]


def chunk_categories(
    names: Sequence[str],
    tokenizer,
    max_text_len: int = 256,
    classes_per_prompt: Optional[int] = None,
) -> List[List[int]]:
    """
    Splits a category list into groups whose prompt fits the text encoder.

    Args:
        names: category names (e.g. the 1203 LVIS classes).
        tokenizer: the model's tokenizer.
        max_text_len: token limit including [CLS] and [SEP] (256).
        classes_per_prompt: at most this many classes per group (mmdetection's LVIS protocol
            uses 40); None: as many as fit in ``max_text_len`` tokens (the official code's).
            A group of that many that does not fit is shortened, never truncated.

    Returns:
        Consecutive groups of category indices; the prompt of a group is
        ``caption_from_categories([names[i] for i in group])[0]`` and has at most
        ``max_text_len`` tokens.

    Raises:
        ValueError: for an empty list, an empty name, a name too long to fit alone, or a
            ``classes_per_prompt`` that is not a positive int.
    """
    check_classes_per_prompt(classes_per_prompt)
    caption_from_categories(names)  # validates the names
    lengths = category_token_costs(names, tokenizer)
    budget = max_text_len - 2
    for i, length in enumerate(lengths):
        if length > budget:
            raise ValueError(
                f"Category {i} ({names[i][:60]!r}) has {length - 1} tokens; with [CLS], "
                f"[SEP] and '.' it exceeds max_text_len={max_text_len}"
            )

    def fits(start: int, end: int) -> bool:
        caption, _ = caption_from_categories(names[start:end])
        return count_tokens(tokenizer, caption) <= max_text_len

    groups = _greedy(lengths, budget, fits, classes_per_prompt)
    for start, end in groups:
        if not fits(start, end):
            raise ValueError(
                f"Category {start} ({names[start][:60]!r}) does not fit in "
                f"max_text_len={max_text_len} tokens"
            )
    return [list(range(start, end)) for start, end in groups]


def chunk_caption(caption: str, tokenizer, max_text_len: int = 256) -> List[Tuple[str, int]]:
    """
    Splits a long caption at phrase boundaries (after a run of ".") into sub-captions that
    fit the text encoder. Chunks of a normalised caption end with "." and so are normalised
    themselves.

    Args:
        caption: the caption (normalise it first).
        tokenizer: the model's tokenizer.
        max_text_len: token limit including [CLS] and [SEP] (256).

    Returns:
        ``(sub_caption, offset)`` pairs: ``caption[offset:offset + len(sub_caption)] ==
        sub_caption``; sub-captions are stripped of surrounding spaces. A caption that fits
        comes back whole as ``[(caption, 0)]``.

    Raises:
        ValueError: when a single phrase is longer than the limit (names its start and
            token count).
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"chunk_caption needs a non-empty caption, got {caption!r}")
    if count_tokens(tokenizer, caption) <= max_text_len:
        return [(caption, 0)]
    matches = list(_PHRASE.finditer(caption))
    lengths = _piece_lengths(tokenizer, [m.group(0) for m in matches])
    budget = max_text_len - 2
    for match, length in zip(matches, lengths):
        if length > budget:
            text = match.group(0)
            start = match.start() + len(text) - len(text.lstrip())
            raise ValueError(
                f"The phrase starting at character {start} "
                f"({match.group(0).strip()[:60]!r}) has {length} tokens; with [CLS] and [SEP] "
                f"it exceeds max_text_len={max_text_len}. Split it with '.'."
            )

    def text_of(start: int, end: int) -> Tuple[str, int]:
        beg, stop = matches[start].start(), matches[end - 1].end()
        raw = caption[beg:stop]
        lead = len(raw) - len(raw.lstrip())
        return raw.strip(), beg + lead

    def fits(start: int, end: int) -> bool:
        return count_tokens(tokenizer, text_of(start, end)[0]) <= max_text_len

    chunks = []
    for start, end in _greedy(lengths, budget, fits):
        text, offset = text_of(start, end)
        if not text:
            continue
        if not fits(start, end):
            raise ValueError(
                f"The text starting at character {offset} does not fit in "
                f"max_text_len={max_text_len} tokens"
            )
        chunks.append((text, offset))
    return chunks
