"""Captions: the official normalisation, detection captions from category names, and span
bookkeeping when a caption is rewritten (normalisation, left/right swap under a flip)."""

import random
import re
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "clean_category_name",
    "Span",
    "check_spans",
    "normalize_caption",
    "normalize_caption_with_spans",
    "caption_from_categories",
    "swap_left_right",
]

Span = Tuple[int, int]

# "left"/"right" (and "leftmost"/"rightmost") as whole words.
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most)?\b)")


def _check_caption(caption) -> None:
    if caption is None or not isinstance(caption, str):
        raise ValueError(f"A caption must be a non-empty string, got {caption!r}")
    if not caption.strip():
        raise ValueError(f"A caption must not be empty or blank, got {caption!r}")


def normalize_caption(caption: str) -> str:
    """
    The caption normalisation of the official ``predict()``: lowercase, strip, and end with
    a period. Where the official code appends "." we append " ." (the project's contract);
    BERT splits punctuation from words, so both give the same token ids.

    Args:
        caption: the raw prompt.

    Returns:
        The normalised caption, e.g. ``"A Cat"`` -> ``"a cat ."``.

    Raises:
        ValueError: if the caption is None, not a string, empty or blank.
    """
    _check_caption(caption)
    result = caption.lower().strip()
    if not result.endswith("."):
        result = result + " ."
    return result


def _offset_table(pieces_lengths: Sequence[int]) -> List[int]:
    table = [0]
    for length in pieces_lengths:
        table.append(table[-1] + length)
    return table


def normalize_caption_with_spans(
    caption: str, spans: Sequence[Sequence[Sequence[int]]]
) -> Tuple[str, List[List[Span]]]:
    """
    :func:`normalize_caption` that also moves character spans into the normalised caption
    (stripping shifts them; lowercasing may change the length of some characters).

    Args:
        caption: the raw caption.
        spans: per object, a list of ``[beg, end)`` character spans in ``caption``.

    Returns:
        (normalised caption, spans in it).

    Raises:
        ValueError: for an empty caption or a span outside it.
    """
    _check_caption(caption)
    check_spans(caption, spans)
    lowered = caption.lower()
    char_lengths = [len(c.lower()) for c in caption]
    if sum(char_lengths) != len(lowered):  # context-dependent lowercasing: no length change
        char_lengths = [1] * len(caption)
    table = _offset_table(char_lengths)
    lead = len(lowered) - len(lowered.lstrip())
    stripped = lowered.strip()
    normalized = normalize_caption(caption)

    def move(index: int) -> int:
        return min(max(table[index] - lead, 0), len(stripped))

    new_spans = [[(move(beg), move(end)) for beg, end in obj] for obj in spans]
    return normalized, new_spans


def check_spans(caption: str, spans: Sequence[Sequence[Sequence[int]]], what: str = "") -> None:
    """
    Raises ValueError naming the first span that is not ``0 <= beg < end <= len(caption)``.

    Args:
        caption: the caption the spans index.
        spans: per object, a list of ``[beg, end)`` spans.
        what: text naming the record, prepended to the error message.
    """
    prefix = f"{what}: " if what else ""
    for i, obj in enumerate(spans):
        for span in obj:
            if len(span) != 2:
                raise ValueError(f"{prefix}span {span!r} of object {i} is not [beg, end]")
            beg, end = span
            if not (0 <= beg < end <= len(caption)):
                raise ValueError(
                    f"{prefix}span [{beg}, {end}) of object {i} lies outside its caption "
                    f"(length {len(caption)}): {caption!r}"
                )


def clean_category_name(name: str) -> str:
    """
    A dataset's category name as a prompt phrase: underscores become spaces and parenthesised
    qualifiers go (LVIS's "bow_(weapon)" -> "bow"), as MM-Grounding-DINO cleans LVIS names.
    A name that would become empty is kept as given (with spaces for underscores).
    """
    spaced = name.replace("_", " ")
    cleaned = re.sub(r"\s+", " ", re.sub(r"\(.*?\)", "", spaced)).strip()
    return cleaned or re.sub(r"\s+", " ", spaced).strip()


def caption_from_categories(
    names: Sequence[str], shuffle: bool = False, rng: Optional[random.Random] = None
) -> Tuple[str, List[List[Span]]]:
    """
    Builds a detection prompt as the official ``build_captions_and_token_span`` does:
    lowercased names, words separated by one space, each name followed by " .", e.g.
    ``["Cat", "traffic light"]`` -> ``"cat . traffic light ."``.

    Args:
        names: category names.
        shuffle: put the names in random order in the caption.
        rng: random source with a ``shuffle`` method (``random.Random`` or a numpy
            ``Generator``); the ``random`` module when None.

    Returns:
        caption: the prompt.
        spans: per category, in the order of ``names`` (also when shuffled), the
            ``(beg, end)`` character spans of its words in the caption.

    Raises:
        ValueError: for an empty list or an empty/blank name.
    """
    if len(names) == 0:
        raise ValueError("caption_from_categories needs at least one category name")
    words_per_name = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Category name {i} is empty or not a string: {name!r}")
        words_per_name.append(name.lower().split())
    order = list(range(len(names)))
    if shuffle:
        (rng if rng is not None else random).shuffle(order)

    spans: List[List[Span]] = [[] for _ in names]
    caption = ""
    for index in order:
        for word in words_per_name[index]:
            if caption:
                caption += " "
            spans[index].append((len(caption), len(caption) + len(word)))
            caption += word
        caption += " ."
    return caption, spans


def swap_left_right(
    caption: str, spans: Sequence[Sequence[Sequence[int]]] = ()
) -> Tuple[str, List[List[Span]]]:
    """
    Swaps the words "left" and "right" (also in "leftmost"/"rightmost") for a horizontally
    flipped image, moving the character spans with the text.

    Args:
        caption: a lowercase caption.
        spans: per object, ``[beg, end)`` spans in ``caption``.

    Returns:
        (new caption, spans in it). A span boundary that falls inside a swapped word is
        clamped to that word.
    """
    pieces = []
    moves = []  # (old_start, old_end, new_start, new_end)
    last = 0
    new_length = 0
    for match in _LEFT_RIGHT.finditer(caption):
        start, end = match.span()
        pieces.append(caption[last:start])
        new_length += start - last
        word = "right" if match.group(1) == "left" else "left"
        pieces.append(word)
        moves.append((start, end, new_length, new_length + len(word)))
        new_length += len(word)
        last = end
    pieces.append(caption[last:])
    new_caption = "".join(pieces)
    if not moves:
        return caption, [[tuple(s) for s in obj] for obj in spans]

    def move(index: int) -> int:
        shift = 0
        for old_start, old_end, new_start, new_end in moves:
            if index >= old_end:
                shift = new_end - old_end
            elif index > old_start:
                return new_start + min(index - old_start, new_end - new_start)
            else:
                break
        return index + shift

    new_spans = [[(move(beg), move(end)) for beg, end in obj] for obj in spans]
    return new_caption, new_spans
