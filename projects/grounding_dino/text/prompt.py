"""The prompt encoder: the one tokeniser of the model, the dataset mapper and post-processing.

A prompt (a caption, or a list of category names) becomes one or more :class:`PromptRun`\\ s,
each tokenised once; :meth:`PromptEncoder.batch` pads the stored ids of a batch of runs into a
:class:`TokenizedText` with the sub-sentence masks. :data:`SPECIAL_TOKENS` is the one table of
the tokens that close a phrase.
"""

from typing import Dict, List, Optional, Sequence, Union

import torch

from .captions import caption_from_categories, normalize_caption, normalize_caption_with_spans
from .chunking import check_classes_per_prompt, chunk_caption, chunk_categories
from .masks import sub_sentence_masks
from .phrases import phrases_from_token_scores
from .positive_map import positive_map_from_spans
from .structures import PromptRun, TokenizedText
from .tokenizer import check_fast, load_tokenizer

__all__ = ["SPECIAL_TOKENS", "PromptRun", "TokenizedText", "PromptEncoder"]

# The tokens that close a phrase (the official ``specical_tokens``): the sub-sentence masks
# and position ids restart after each of them. "." and "?" are also caption text: they
# separate the phrases of a caption.
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")
_BOUNDARY_TOKENS = ("[CLS]", "[SEP]")
_SEPARATORS = tuple(t for t in SPECIAL_TOKENS if t not in _BOUNDARY_TOKENS)


class PromptEncoder:
    """
    Turns prompts into tokenised prompt runs, batches them for the text encoder, and answers
    the token questions of training and post-processing (positive maps, word tokens, phrase
    indices, phrases of detections). It has no parameters; it pickles as its arguments and
    reloads its tokenizer through the cached :func:`load_tokenizer`.
    """

    def __init__(
        self,
        *,
        tokenizer_name_or_path: str,
        max_text_len: int,
        classes_per_prompt: Optional[int] = None,
    ):
        """
        Args:
            tokenizer_name_or_path: a fast Hugging Face tokenizer's hub name or local folder
                (the text encoder's, e.g. "bert-base-uncased").
            max_text_len: tokens of one pass, [CLS] and [SEP] included (256); longer prompts
                are chunked.
            classes_per_prompt: at most this many classes in one pass of a category list
                (mmdetection's LVIS protocol: 40); None: as many as fit in ``max_text_len``
                tokens. Captions are not affected.
        """
        if not isinstance(tokenizer_name_or_path, str) or not tokenizer_name_or_path:
            raise ValueError(
                f"tokenizer_name_or_path must be a hub name or folder, got "
                f"{tokenizer_name_or_path!r}"
            )
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self._setup(load_tokenizer(tokenizer_name_or_path), max_text_len, classes_per_prompt)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, *, max_text_len: int, classes_per_prompt: Optional[int] = None
    ) -> "PromptEncoder":
        """A prompt encoder around an already loaded fast tokenizer (pickled with it)."""
        encoder = cls.__new__(cls)
        encoder.tokenizer_name_or_path = None
        encoder._setup(tokenizer, max_text_len, classes_per_prompt)
        return encoder

    def _setup(self, tokenizer, max_text_len: int, classes_per_prompt: Optional[int]) -> None:
        check_fast(tokenizer)
        check_classes_per_prompt(classes_per_prompt)
        self._classes_per_prompt = classes_per_prompt
        if isinstance(max_text_len, bool) or not isinstance(max_text_len, int):
            raise TypeError(f"max_text_len must be an int, got {max_text_len!r}")
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3 ([CLS] x [SEP]), got {max_text_len}")
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        missing = [
            t for t, i in zip(SPECIAL_TOKENS, ids) if i is None or i == tokenizer.unk_token_id
        ]
        if missing:
            raise ValueError(
                f"Tokenizer {type(tokenizer).__name__} has no token for {missing} (the "
                f"phrase-closing tokens {SPECIAL_TOKENS}); use a BERT-vocabulary tokenizer"
            )
        self._tokenizer = tokenizer
        self._max_text_len = max_text_len
        self._special_token_ids = ids
        self._cls_id, self._sep_id = (ids[SPECIAL_TOKENS.index(t)] for t in _BOUNDARY_TOKENS)
        self._separator_ids = [ids[SPECIAL_TOKENS.index(t)] for t in _SEPARATORS]
        # Not part of a phrase: the phrase-closing tokens and every special token of the
        # vocabulary ([PAD], [UNK], [MASK], ...), as the official post-processing.
        self._non_word_ids = sorted(set(ids) | set(tokenizer.all_special_ids))

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        if self.tokenizer_name_or_path is not None:
            state["_tokenizer"] = None  # reloaded (cached) on unpickling
        return state

    def __setstate__(self, state: Dict) -> None:
        self.__dict__.update({"_classes_per_prompt": None, **state})  # pickles from before it
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name_or_path)

    def __repr__(self) -> str:
        name = self.tokenizer_name_or_path or type(self._tokenizer).__name__
        return (
            f"PromptEncoder(tokenizer={name!r}, max_text_len={self._max_text_len}, "
            f"classes_per_prompt={self._classes_per_prompt})"
        )

    # ---------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        """The fast Hugging Face tokenizer."""
        return self._tokenizer

    @property
    def max_text_len(self) -> int:
        return self._max_text_len

    @property
    def classes_per_prompt(self) -> Optional[int]:
        """At most this many classes in one pass of a category list (None: as many as fit)."""
        return self._classes_per_prompt

    @property
    def special_token_ids(self) -> List[int]:
        """Ids of :data:`SPECIAL_TOKENS` (101, 102, 1012, 1029 for bert-base-uncased)."""
        return list(self._special_token_ids)

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    # ------------------------------------------------------------------------- tokenising
    def tokenize(self, caption: str):
        """
        Tokenises one caption whole (no truncation, no padding), with character offsets.

        Returns:
            ``BatchEncoding`` of one caption: ``input_ids`` (list of ints, [CLS] ... [SEP]),
            ``offset_mapping``; ``char_to_token(i)`` works on it.
        """
        if not isinstance(caption, str):
            raise TypeError(f"tokenize() takes one caption string, got {type(caption).__name__}")
        return self._tokenizer(caption, return_offsets_mapping=True)

    def positive_map(self, caption: str, spans, encoding=None) -> torch.Tensor:
        """
        The official positive map of the objects' character spans (see
        :func:`positive_map_from_spans`), on the caption truncated at ``max_text_len``
        tokens as the tokenizer truncates (the last kept position holds [SEP]): tokens
        beyond it mark nothing.

        Args:
            caption: the (normalised) caption.
            spans: N objects, each a list of ``[beg, end)`` character spans in ``caption``.
            encoding: ``self.tokenize(caption)`` when the caller has it (one tokenisation).

        Returns:
            FloatTensor [N, max_text_len], rows summing to 1 (0 for objects without tokens).
        """
        if encoding is None:
            encoding = self.tokenize(caption)
        too_long = len(encoding["input_ids"]) > self._max_text_len
        return positive_map_from_spans(
            encoding,
            spans,
            self._max_text_len,
            caption=caption,
            token_limit=self._max_text_len - 1 if too_long else None,
        )

    # ------------------------------------------------------------------------ prompt runs
    def runs_for_input(self, index: int, record: Dict) -> List[PromptRun]:
        """
        Turns one model input's prompt into passes of at most ``max_text_len`` tokens.

        Args:
            index: the input's index in the batch (``PromptRun.image_index``).
            record: a model input with ``"caption"`` (str) or ``"category_names"`` (list of
                str). Category lists are chunked into groups that fit, each with its
                positive map; captions are normalised and split at phrase boundaries when
                too long. A caption with ``"token_spans"`` (official ``--token_spans``: per
                phrase, a list of ``[beg, end)`` character spans of the caption) makes one
                run whose "categories" are those phrases, scored through their positive
                map as class lists are. A caption may come with the mapper's
                ``"input_ids"`` (list of ints or 1-D tensor, the caption's whole
                tokenisation): they are used as they are and make one run, cut at
                ``max_text_len`` by :meth:`batch` as in training (the mapper's positive maps
                are built on the same cut).

        Returns:
            The runs, in order.

        Raises:
            ValueError: no prompt, both prompts, an empty category list, an empty caption,
                a phrase or category longer than ``max_text_len``, a caption with token spans
                longer than ``max_text_len``, or ``input_ids`` that are not a tokenised
                normalised caption.
        """
        names = record.get("category_names")
        caption = record.get("caption")
        if names is not None and caption is not None:
            raise ValueError(f"Input {index}: give 'caption' or 'category_names', not both")
        if names is not None:
            if isinstance(names, str) or len(names) == 0:
                raise ValueError(f"Input {index}: 'category_names' must be a non-empty list")
            return self._category_runs(index, list(names))
        if caption is None:
            raise ValueError(f"Input {index}: no prompt; give 'caption' or 'category_names'")
        if record.get("token_spans") is not None:
            return [self._token_span_run(index, caption, record["token_spans"])]
        normalized = normalize_caption(caption)
        if record.get("input_ids") is not None:
            ids = self._check_input_ids(index, record["input_ids"], caption, normalized)
            return [PromptRun(index, normalized, ids)]
        return self._caption_runs(index, normalized)

    def _category_runs(self, index: int, names: List[str]) -> List[PromptRun]:
        runs = []
        chunks = chunk_categories(
            names, self._tokenizer, self._max_text_len, self._classes_per_prompt
        )
        for group in chunks:
            caption, spans = caption_from_categories([names[i] for i in group])
            encoding = self.tokenize(caption)
            positive_map = self.positive_map(caption, spans, encoding)
            runs.append(
                PromptRun(index, caption, list(encoding["input_ids"]), list(group), positive_map)
            )
        return runs

    def _token_span_run(self, index: int, caption: str, token_spans) -> PromptRun:
        normalized, spans = normalize_caption_with_spans(caption, token_spans)
        encoding = self.tokenize(normalized)
        if len(encoding["input_ids"]) > self._max_text_len:
            raise ValueError(
                f"Input {index}: token spans need the caption in one pass: it has "
                f"{len(encoding['input_ids'])} tokens, more than {self._max_text_len}"
            )
        positive_map = self.positive_map(normalized, spans, encoding)
        phrases = list(range(len(spans)))
        return PromptRun(index, normalized, list(encoding["input_ids"]), phrases, positive_map)

    def _caption_runs(self, index: int, caption: str) -> List[PromptRun]:
        ids = self._tokenizer(caption)["input_ids"]
        if len(ids) <= self._max_text_len:
            return [PromptRun(index, caption, ids)]
        # Chunks of a normalised caption end in "." and are normalised themselves.
        texts = [text for text, _ in chunk_caption(caption, self._tokenizer, self._max_text_len)]
        runs, phrase_offset = [], 0
        for text, chunk_ids in zip(texts, self._tokenizer(texts)["input_ids"]):
            runs.append(PromptRun(index, text, chunk_ids, phrase_offset=phrase_offset))
            phrase_offset += self.count_phrases(text)
        return runs

    def _check_input_ids(self, index: int, input_ids, caption: str, normalized: str) -> List[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 1:
                raise ValueError(
                    f"Input {index}: 'input_ids' must be 1-D, got shape {tuple(input_ids.shape)}"
                )
            input_ids = input_ids.tolist()
        ids = [int(i) for i in input_ids]
        if caption != normalized:
            raise ValueError(
                f"Input {index}: 'input_ids' come with a caption that is not normalised "
                f"({caption[:60]!r}); the mapper's captions are"
            )
        if len(ids) < 2 or ids[0] != self._cls_id or ids[-1] != self._sep_id:
            raise ValueError(
                f"Input {index}: 'input_ids' must be a whole tokenised caption, [CLS] "
                f"({self._cls_id}) ... [SEP] ({self._sep_id}), got {ids[:3]}...{ids[-3:]}"
            )
        return ids

    def batch(self, runs: Sequence[PromptRun], device=None) -> TokenizedText:
        """
        Pads the runs' ids to the longest and builds the sub-sentence masks and position ids;
        as the official model, they are built on the whole captions and then cut at
        ``max_text_len`` tokens.

        Args:
            runs: R prompt runs.
            device: where the tensors are built (None: the CPU).

        Returns:
            :class:`TokenizedText` of R rows and L = min(longest run, max_text_len) tokens.
        """
        if len(runs) == 0:
            raise ValueError("PromptEncoder.batch needs at least one prompt run")
        lengths = [len(run.input_ids) for run in runs]
        length = max(lengths)
        pad = self.pad_token_id
        rows = [list(run.input_ids) + [pad] * (length - n) for run, n in zip(runs, lengths)]
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        token_mask = torch.arange(length, device=device)[None] < torch.tensor(
            lengths, device=device
        ).unsqueeze(1)
        self_attention_mask, position_ids = sub_sentence_masks(input_ids, self._special_token_ids)
        cut = self._max_text_len
        if length > cut:
            input_ids, token_mask, position_ids = (
                t[:, :cut] for t in (input_ids, token_mask, position_ids)
            )
            self_attention_mask = self_attention_mask[:, :cut, :cut]
        return TokenizedText(
            input_ids=input_ids,
            token_mask=token_mask,
            self_attention_mask=self_attention_mask,
            position_ids=position_ids,
            token_type_ids=torch.zeros_like(input_ids),
        )

    # ------------------------------------------------------------------- token helpers
    def _isin(self, input_ids: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def word_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids: [..., L] token ids.

        Returns:
            [..., L] bool, True on word tokens: not a phrase-closing token ([CLS], [SEP], ".",
            "?") nor a special token of the vocabulary ([PAD], [UNK], [MASK]).
        """
        return ~self._isin(input_ids, self._non_word_ids)

    def phrase_index_of_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids: [..., L] token ids of one caption (or a batch).

        Returns:
            [..., L] long, the phrase each token belongs to: the number of "." and "?" tokens
            before it (a separator belongs to the phrase it closes).
        """
        separators = self._isin(input_ids, self._separator_ids).long()
        return separators.cumsum(-1) - separators

    @staticmethod
    def count_phrases(caption: str) -> int:
        """Number of "." and "?" in a caption: the tokens that close its phrases (BERT splits
        every punctuation character into a token of its own)."""
        return sum(caption.count(separator) for separator in _SEPARATORS)

    def phrases(
        self, token_scores: torch.Tensor, input_ids: Union[torch.Tensor, List[int]], text_threshold
    ) -> List[str]:
        """
        The official phrases of detections (see :func:`phrases_from_token_scores`).

        Args:
            token_scores: [N, L'] token probabilities.
            input_ids: [L] the caption's token ids.
            text_threshold: tokens scoring above it form the phrase.

        Returns:
            N strings.
        """
        return phrases_from_token_scores(token_scores, input_ids, self._tokenizer, text_threshold)
