"""Text -> ids: the text modality's preprocessor, collate and webdataset decoders."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from peace_registry.errors import PeaceError
from peace_text.options import TextOptions
from peace_text.tokenizer import build_tokenizer
from peace_text.tokenizer_base import TextEncoding, TextTokenizer

#: Keys of a webdataset ``.json`` sample that hold its text, in order of preference.
JSON_TEXT_KEYS = ("caption", "text")


#: A lone UTF-16 surrogate: a Python ``str`` can hold one (``surrogateescape``), Unicode text not.
_SURROGATE = re.compile("[\ud800-\udfff]")


class TextInputError(PeaceError, ValueError):
    """A raw text item that cannot be read (undecodable bytes, a JSON without a caption...)."""


def decode_txt(data: bytes) -> str:
    """A ``.txt`` file: UTF-8 (a byte-order mark is dropped), without the final line break."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextInputError(f"text file is not UTF-8 ({err})") from None
    return text.rstrip("\r\n")


def decode_json(data: bytes) -> str:
    """A ``.json`` file: its ``caption`` (else ``text``) field; of a list of captions, the first."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise TextInputError(f"json file does not parse ({err})") from None
    if isinstance(record, dict):
        for key in JSON_TEXT_KEYS:
            value = record.get(key)
            if isinstance(value, list) and value and isinstance(value[0], str):
                value = value[0]
            if isinstance(value, str):
                return value
        found = sorted(record)[:10]
    else:
        found = type(record).__name__
    raise TextInputError(
        f"json sample has no text: expected a string (or list of strings) under "
        f"{' or '.join(JSON_TEXT_KEYS)!s}, found {found}"
    )


# Pieces for varied example texts: scripts, emoji, whitespace, punctuation, long runs.
_WORDS = (
    "a dog runs on the beach",
    "two cats sleep on a red sofa",
    "the quick brown fox jumps over the lazy dog",
    "Café crème brûlée",
    "日本語のテキスト",
    "Ελληνικά ΟΔΟΣ",
    "emoji 🎉🐶👍🏽",
    "tab\tseparated\twords",
    "first line\nsecond line",
    "numbers 3.14159 and 42%",
    "don't stop, you'll see!",
)


class TextPreprocessor:
    """``str`` (or UTF-8 ``bytes``) -> ``{"tokens": long [L], "word_start": bool [L]}``; ``L`` is
    at most ``max_tokens + 1`` (EOS last). ``collate`` pads with ``pad_id``."""

    def __init__(self, options: TextOptions, tokenizer: TextTokenizer | None = None) -> None:
        if not isinstance(options, TextOptions):
            raise TypeError(f"TextPreprocessor expects TextOptions, got {type(options).__name__}")
        self.options = options
        self.tokenizer = build_tokenizer(options) if tokenizer is None else tokenizer
        if self.tokenizer.vocab_size != options.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids, options.vocab_size is "
                f"{options.vocab_size}"
            )
        self.decoders: Mapping[str, Callable[[bytes], Any]] = {
            "txt": decode_txt,
            "text": decode_txt,
            "json": decode_json,
        }

    @staticmethod
    def as_text(item: Any) -> str:
        """``item`` as a string: ``str`` as is, ``bytes`` decoded as UTF-8.

        Any valid Unicode is accepted, of any length (tokenizers keep the first ``max_tokens``
        tokens). A ``str`` holding a lone surrogate (``"\\ud800"``, as ``surrogateescape`` makes)
        is not Unicode text: every tokenizer would fail on it differently, so it is a
        :class:`TextInputError` naming its position."""
        if isinstance(item, str):
            surrogate = _SURROGATE.search(item)
            if surrogate is not None:
                raise TextInputError(
                    f"text holds a lone surrogate {surrogate.group()!r} at position "
                    f"{surrogate.start()}: not valid Unicode (decode bytes with errors='replace')"
                )
            return item
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                return bytes(item).decode("utf-8")
            except UnicodeDecodeError as err:
                raise TextInputError(f"text bytes are not UTF-8 ({err})") from None
        raise TypeError(f"text input must be str or UTF-8 bytes, got {type(item).__name__}")

    @staticmethod
    def _sample(encoding: TextEncoding) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.tensor(encoding.ids, dtype=torch.long),
            "word_start": torch.tensor(encoding.word_start, dtype=torch.bool),
        }

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        """One text -> one sample. ``train`` changes nothing: text has no augmentation."""
        (encoding,) = self.tokenizer.encode_with_word_starts([self.as_text(item)])
        return self._sample(encoding)

    def batch(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Many texts straight to a collated batch (one tokenizer call for all of them)."""
        texts = [self.as_text(item) for item in items]
        return self.collate(
            [self._sample(e) for e in self.tokenizer.encode_with_word_starts(texts)]
        )

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest sample: ``tokens`` with ``pad_id``, ``word_start`` with False."""
        if not samples:
            raise ValueError("cannot collate an empty list of text samples")
        for index, sample in enumerate(samples):
            missing = [k for k in ("tokens", "word_start") if k not in sample]
            if missing:
                raise KeyError(f"text sample {index} lacks {missing} (has {sorted(sample)})")
            if sample["tokens"].ndim != 1 or sample["word_start"].shape != sample["tokens"].shape:
                raise ValueError(
                    f"text sample {index}: 'tokens' and 'word_start' must be 1-D of equal length"
                )
        width = max(len(sample["tokens"]) for sample in samples)
        tokens = torch.full((len(samples), width), self.options.pad_id, dtype=torch.long)
        word_start = torch.zeros(len(samples), width, dtype=torch.bool)
        for row, sample in enumerate(samples):
            length = len(sample["tokens"])
            tokens[row, :length] = sample["tokens"]
            word_start[row, :length] = sample["word_start"]
        return {"tokens": tokens, "word_start": word_start}

    def examples(self, count: int, seed: int = 0) -> list[str]:
        """Varied valid texts: the empty string, short and long ones (longer than ``max_tokens``),
        several scripts, emoji, tabs and line breaks."""
        rng = random.Random(seed)
        texts: list[str] = []
        for index in range(count):
            kind = (index + seed) % 4
            if kind == 0:
                texts.append(rng.choice(("", " ", "a")))
            elif kind == 1:
                texts.append(rng.choice(_WORDS))
            elif kind == 2:
                picked = rng.sample(_WORDS, k=rng.randint(2, 4))
                texts.append(" ".join(picked).capitalize() + ".")
            else:
                words = " ".join(rng.choice(_WORDS) for _ in range(self.options.max_tokens))
                texts.append(words)
        return texts
