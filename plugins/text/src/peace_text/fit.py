"""Text options fitted to training data: a ``kind = "fit"`` tokenizer trained on the captions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from peace_text.options import FitTokenizerOptions, TextOptions
from peace_text.preprocess import TextInputError, decode_json, decode_txt
from peace_text.tokenizer import TokenizerFitError, text_options_for
from peace_text.trained import train_tokenizer

#: Sample members that hold a caption, in order of preference (as the preprocessor reads them).
_CAPTION_DECODERS = (("txt", decode_txt), ("text", decode_txt), ("json", decode_json))


def captions(samples: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The caption of every raw sample (webdataset dict) that has a readable one."""
    for sample in samples:
        for key, decode in _CAPTION_DECODERS:
            data = sample.get(key)
            if data is None:
                continue
            try:
                text = decode(data) if isinstance(data, (bytes, bytearray)) else str(data)
            except TextInputError:
                continue  # the data pipeline counts and reports such samples
            if text.strip():
                yield text
            break


def fit_text_options(options: TextOptions, samples: Iterable[Mapping[str, Any]]) -> TextOptions:
    """``options`` with its ``fit`` tokenizer trained on the captions of ``samples`` (raw
    webdataset dicts, or ``{"txt": caption}``); other options are returned unchanged."""
    if not isinstance(options, TextOptions):
        raise TypeError(f"fit_text_options expects TextOptions, got {type(options).__name__}")
    spec = options.tokenizer
    if not isinstance(spec, FitTokenizerOptions):
        return options
    texts = list(islice(captions(samples), spec.max_texts))
    if not texts:
        raise TokenizerFitError(
            "text tokenizer kind 'fit': the training data holds no captions to train it on "
            "(expected .txt members or .json members with a 'caption' or 'text' field)"
        )
    tokenizer = train_tokenizer(
        texts,
        spec.vocab_size,
        min_frequency=spec.min_frequency,
        max_tokens=options.max_tokens,
        lowercase=options.lowercase,
    )
    rest = options.model_dump(exclude={"tokenizer", "vocab_size", "max_tokens", "lowercase"})
    return text_options_for(tokenizer, **rest)
