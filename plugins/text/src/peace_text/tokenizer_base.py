"""What every text tokenizer shares: the protocol, the encoding type and the byte-level BPE path.

A tokenizer turns texts into MODEL ids: optional lower-casing, then its own pieces, the first
``max_tokens`` kept, EOS appended; plus a ``word_start`` flag per id for whole-word masking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from peace_text.options import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

    from peace_text.options import (
        ByteTokenizerOptions,
        OfficialTokenizerOptions,
        TrainedTokenizerOptions,
    )

#: Byte-level BPE writes the space byte as this character: a piece starting with it starts a word.
SPACE_MARK = "Ġ"

#: Ids that never stand for text (decode drops them).
NON_TEXT_IDS = frozenset({BOS_ID, PAD_ID, EOS_ID})


@dataclass(frozen=True)
class TextEncoding:
    """One encoded text: model ids ending with EOS, and which of them begin a word.

    ``word_start`` is True on the first token and on every token that begins a word; False on EOS.
    """

    ids: list[int]
    word_start: list[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.word_start):
            raise ValueError(
                f"TextEncoding: {len(self.ids)} ids but {len(self.word_start)} word_start flags"
            )


@runtime_checkable
class TextTokenizer(Protocol):
    """The protocol of the official, trained and byte tokenizers."""

    kind: ClassVar[str]
    max_tokens: int
    lowercase: bool

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Model ids of each text (at most ``max_tokens`` tokens, then EOS)."""
        ...

    def encode_with_word_starts(self, texts: Sequence[str]) -> list[TextEncoding]:
        """Like :meth:`encode`, with the word-start flag of every id."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special ids dropped; lower-casing cannot be undone)."""
        ...

    def to_options(
        self,
    ) -> OfficialTokenizerOptions | TrainedTokenizerOptions | ByteTokenizerOptions:
        """The ``tokenizer`` field of the text options that rebuilds this tokenizer."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, or a ``TypeError`` naming what is not a string."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"expected a list of strings, got a single {type(texts).__name__}; wrap it in a list"
        )
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, expected str")
    return texts


def normalise_text(text: str, *, lowercase: bool, prepend_space: bool) -> str:
    """The text pieces are cut from: ``str.lower`` (as the official pipeline), one leading space."""
    if lowercase:
        text = text.lower()
    return " " + text if prepend_space else text


def finish_encoding(ids: list[int], word_start: list[bool], max_tokens: int) -> TextEncoding:
    """Keep the first ``max_tokens`` tokens, mark the first as a word start, append EOS."""
    ids, word_start = ids[:max_tokens], word_start[:max_tokens]
    if word_start:
        word_start[0] = True
    return TextEncoding([*ids, EOS_ID], [*word_start, False])


class BaseTextTokenizer:
    """Shared behaviour: normalisation, and ``encode`` through ``encode_with_word_starts``."""

    kind: ClassVar[str] = ""
    #: Whether a space goes in front of every text (GPT-2 style: the first word then looks like
    #: every other word, ``"Ġword"``).
    prepend_space: ClassVar[bool] = True

    def __init__(self, *, max_tokens: int = 70, lowercase: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.lowercase = lowercase

    def normalise(self, text: str) -> str:
        return normalise_text(text, lowercase=self.lowercase, prepend_space=self.prepend_space)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.encode_with_word_starts(texts)]

    def encode_with_word_starts(self, texts: Sequence[str]) -> list[TextEncoding]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, max_tokens={self.max_tokens}, "
            f"lowercase={self.lowercase})"
        )

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class ByteLevelBPETokenizer(BaseTextTokenizer):
    """A ``tokenizers`` byte-level BPE whose piece ids are mapped to model ids by the subclass."""

    def __init__(self, bpe: Tokenizer, *, max_tokens: int = 70, lowercase: bool = True) -> None:
        super().__init__(max_tokens=max_tokens, lowercase=lowercase)
        self.bpe = bpe

    def model_ids(self, piece_ids: Sequence[int]) -> list[int]:
        """Model ids of BPE piece ids."""
        raise NotImplementedError

    def piece_ids(self, model_ids: Sequence[int]) -> list[int]:
        """BPE piece ids of model ids that stand for text (others are dropped)."""
        raise NotImplementedError

    def _pieces(self, texts: Sequence[str]) -> list[Encoding]:
        batch = [self.normalise(text) for text in check_texts(texts)]
        if len(batch) == 1:
            # One text: skip the library's thread pool, so that DataLoader workers forked later
            # do not inherit (and warn about) a used pool.
            return [self.bpe.encode(batch[0], add_special_tokens=False)]
        return self.bpe.encode_batch(batch, add_special_tokens=False)

    def bpe_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Raw BPE piece ids of the normalised texts: no id mapping, truncation or EOS."""
        return [e.ids for e in self._pieces(texts)]

    def encode_with_word_starts(self, texts: Sequence[str]) -> list[TextEncoding]:
        encodings = self._pieces(texts)
        keep = self.max_tokens
        return [
            finish_encoding(
                self.model_ids(e.ids[:keep]),
                [piece.startswith(SPACE_MARK) for piece in e.tokens[:keep]],
                keep,
            )
            for e in encodings
        ]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.bpe.decode(self.piece_ids(ids), skip_special_tokens=False)
        return text[1:] if self.prepend_space and text.startswith(" ") else text
