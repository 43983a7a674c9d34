"""A byte-level BPE trained by this library, saved as JSON inside the text options.

Same recipe as the official tokenizer (lower-case, one leading space, GPT-2 pre-tokenization,
byte-level pieces), with the four specials at ids 0..3 and the model ids equal to the BPE ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from peace_text.options import (
    BYTE_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TrainedTokenizerOptions,
    trained_vocab_size,
)
from peace_text.tokenizer_base import NON_TEXT_IDS, ByteLevelBPETokenizer, normalise_text


class TrainedTokenizer(ByteLevelBPETokenizer):
    """A byte-level BPE from :func:`train_tokenizer` (or its JSON, via :meth:`from_options`)."""

    kind: ClassVar[str] = "trained"

    def __init__(self, serialized: str, *, max_tokens: int = 70, lowercase: bool = True) -> None:
        self._vocab_size = trained_vocab_size(serialized)  # also checks the JSON is usable
        super().__init__(Tokenizer.from_str(serialized), max_tokens=max_tokens, lowercase=lowercase)
        self.serialized = serialized

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def model_ids(self, piece_ids: Sequence[int]) -> list[int]:
        return list(piece_ids)

    def piece_ids(self, model_ids: Sequence[int]) -> list[int]:
        return [i for i in model_ids if i not in NON_TEXT_IDS and 0 <= i < self._vocab_size]

    def to_options(self) -> TrainedTokenizerOptions:
        return TrainedTokenizerOptions(serialized=self.serialized)

    @classmethod
    def from_options(
        cls, options: TrainedTokenizerOptions, *, max_tokens: int = 70, lowercase: bool = True
    ) -> TrainedTokenizer:
        return cls(options.serialized, max_tokens=max_tokens, lowercase=lowercase)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_tokens: int = 70,
    lowercase: bool = True,
    show_progress: bool = False,
) -> TrainedTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids (4 specials + 256 bytes + merges) on
    ``texts``. Fewer ids result when the corpus has too few frequent pairs: read ``vocab_size`` of
    the result (``peace_text.text_options_for`` copies it into the text options)."""
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {BYTE_VOCAB_SIZE} (4 specials + 256 bytes), got "
            f"{vocab_size}"
        )
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not a single string")

    def corpus() -> Iterator[str]:
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"training text {index} is a {type(text).__name__}, expected str")
            yield normalise_text(text, lowercase=lowercase, prepend_space=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bpe.train_from_iterator(corpus(), trainer=trainer)
    # The trainer registers the specials as "added tokens", which would be matched inside plain
    # text; they stay in the vocabulary (ids 0..3) but are dropped from that list.
    data = json.loads(bpe.to_str())
    data["added_tokens"] = []
    serialized = json.dumps(data, ensure_ascii=False)
    return TrainedTokenizer(serialized, max_tokens=max_tokens, lowercase=lowercase)
