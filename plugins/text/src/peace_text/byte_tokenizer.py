"""UTF-8 bytes as tokens: the fallback that needs no files (id = 4 + byte value, vocabulary 260)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from peace_text.options import BYTE_OFFSET, BYTE_VOCAB_SIZE, ByteTokenizerOptions
from peace_text.tokenizer_base import BaseTextTokenizer, TextEncoding, check_texts, finish_encoding

_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


class ByteTokenizer(BaseTextTokenizer):
    """Every UTF-8 byte is a token. A word is a run of whitespace and the non-whitespace run after
    it (GPT-2's convention: the space belongs to the word it precedes)."""

    kind: ClassVar[str] = "bytes"
    prepend_space: ClassVar[bool] = False

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    def encode_with_word_starts(self, texts: Sequence[str]) -> list[TextEncoding]:
        encodings = []
        for text in check_texts(texts):
            data = self.normalise(text).encode("utf-8")[: self.max_tokens]
            starts = [
                index == 0 or (byte in _WHITESPACE and data[index - 1] not in _WHITESPACE)
                for index, byte in enumerate(data)
            ]
            ids = [BYTE_OFFSET + byte for byte in data]
            encodings.append(finish_encoding(ids, starts, self.max_tokens))
        return encodings

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")

    def to_options(self) -> ByteTokenizerOptions:
        return ByteTokenizerOptions()

    @classmethod
    def from_options(
        cls, options: ByteTokenizerOptions, *, max_tokens: int = 70, lowercase: bool = True
    ) -> ByteTokenizer:
        if not isinstance(options, ByteTokenizerOptions):
            raise TypeError(f"expected ByteTokenizerOptions, got {type(options).__name__}")
        return cls(max_tokens=max_tokens, lowercase=lowercase)
