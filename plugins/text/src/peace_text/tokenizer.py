"""Build the tokenizer that a text options object describes, and options from a tokenizer."""

from __future__ import annotations

from typing import Any

from peace_text.byte_tokenizer import ByteTokenizer
from peace_text.official import OfficialTokenizer
from peace_text.options import (
    ByteTokenizerOptions,
    FitTokenizerOptions,
    OfficialTokenizerOptions,
    TextOptions,
    TrainedTokenizerOptions,
)
from peace_text.tokenizer_base import TextTokenizer
from peace_text.trained import TrainedTokenizer


class TokenizerMismatchError(ValueError):
    """The text options' vocabulary size differs from their tokenizer's."""


class TokenizerFitError(ValueError):
    """A ``fit`` tokenizer is used before it was trained, or cannot be trained (no captions)."""


def build_tokenizer(options: TextOptions) -> TextTokenizer:
    """The tokenizer ``options.tokenizer`` describes, truncating to ``options.max_tokens`` and
    lower-casing per ``options.lowercase``; its vocabulary must equal ``options.vocab_size``."""
    if not isinstance(options, TextOptions):
        raise TypeError(f"build_tokenizer expects TextOptions, got {type(options).__name__}")
    spec = options.tokenizer
    settings = {"max_tokens": options.max_tokens, "lowercase": options.lowercase}
    tokenizer: TextTokenizer
    if isinstance(spec, OfficialTokenizerOptions):
        tokenizer = OfficialTokenizer.from_options(spec, **settings)
    elif isinstance(spec, TrainedTokenizerOptions):
        tokenizer = TrainedTokenizer.from_options(spec, **settings)
    elif isinstance(spec, ByteTokenizerOptions):
        tokenizer = ByteTokenizer.from_options(spec, **settings)
    elif isinstance(spec, FitTokenizerOptions):
        raise TokenizerFitError(
            "the text tokenizer (kind 'fit') has not been trained yet: peace pretrain trains it "
            "on the training captions; in Python, call peace_text.fit_text_options(options, "
            "samples) first"
        )
    else:  # pragma: no cover - the options' discriminated union admits nothing else
        raise TypeError(f"unknown tokenizer options {type(spec).__name__}")
    if tokenizer.vocab_size != options.vocab_size:
        raise TokenizerMismatchError(
            f"text option vocab_size is {options.vocab_size}, but the {tokenizer.kind} tokenizer "
            f"has {tokenizer.vocab_size} ids; set vocab_size={tokenizer.vocab_size} (the token "
            "embedding must have one row per id)"
        )
    return tokenizer


def text_options_for(tokenizer: TextTokenizer, **overrides: Any) -> TextOptions:
    """Text options that rebuild ``tokenizer`` (vocabulary size, truncation, lower-casing and the
    tokenizer itself), with ``overrides`` for the other fields (e.g. ``bucket_size=16``)."""
    fields: dict[str, Any] = {
        "vocab_size": tokenizer.vocab_size,
        "max_tokens": tokenizer.max_tokens,
        "lowercase": tokenizer.lowercase,
        "tokenizer": tokenizer.to_options(),
    }
    return TextOptions(**{**fields, **overrides})
