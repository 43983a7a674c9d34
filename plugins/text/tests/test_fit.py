"""``kind = "fit"`` tokenizers: trained on the captions of raw training samples."""

from __future__ import annotations

import json

import pytest

from peace_text import (
    TextOptions,
    TokenizerFitError,
    build_tokenizer,
    fit_text_options,
)
from peace_text.fit import captions
from peace_text.plugin import build_preprocessor

WORDS = ("red", "green", "blue", "square", "circle", "star", "small", "large")


def _samples(count: int) -> list[dict[str, bytes]]:
    samples = []
    for i in range(count):
        caption = f"a {WORDS[i % 3]} {WORDS[3 + i % 3]}, {WORDS[6 + i % 2]}"
        if i % 2:
            samples.append({"__key__": f"s{i}", "txt": caption.encode()})
        else:
            samples.append({"__key__": f"s{i}", "json": json.dumps({"caption": caption}).encode()})
    return samples


def _fit_options(**tokenizer: object) -> TextOptions:
    return TextOptions(
        tokenizer={"kind": "fit", **tokenizer}, max_tokens=20, max_positions=40, bucket_size=16
    )


def test_captions_come_from_txt_and_json_members_and_bad_ones_are_skipped() -> None:
    raw = [
        {"txt": b"one"},
        {"json": b'{"caption": "two"}'},
        {"json": b"not json"},
        {"png": b"x"},
        {"txt": b"   "},
        {"txt": b"three"},
    ]
    assert list(captions(raw)) == ["one", "two", "three"]


def test_fit_trains_a_tokenizer_and_keeps_the_other_options() -> None:
    options = _fit_options(vocab_size=320)
    assert options.needs_fit
    fitted = fit_text_options(options, _samples(200))
    assert not fitted.needs_fit and fitted.tokenizer.kind == "trained"
    assert 260 < fitted.vocab_size <= 320
    assert (fitted.max_tokens, fitted.max_positions, fitted.bucket_size) == (20, 40, 16)
    tokenizer = build_tokenizer(fitted)
    # A word seen often in training becomes one token (plus EOS).
    assert len(tokenizer.encode(["square"])[0]) <= 2
    # Deterministic: the same samples give the same tokenizer.
    assert fit_text_options(options, _samples(200)) == fitted


def test_fit_reads_at_most_max_texts_and_leaves_other_tokenizers_alone() -> None:
    consumed = []

    def stream():
        for sample in _samples(1000):
            consumed.append(sample)
            yield sample

    fit_text_options(_fit_options(max_texts=50), stream())
    assert len(consumed) == 50
    plain = TextOptions(vocab_size=260, tokenizer={"kind": "bytes"})
    untouched = iter(_samples(3))
    assert fit_text_options(plain, untouched) is plain
    assert next(untouched)["__key__"] == "s0"  # not read at all


def test_an_unfitted_tokenizer_cannot_be_used_and_fitting_needs_captions() -> None:
    options = _fit_options()
    with pytest.raises(TokenizerFitError, match=r"not been trained yet.*fit_text_options"):
        build_tokenizer(options)
    with pytest.raises(TokenizerFitError, match="not been trained yet"):
        build_preprocessor(options)
    with pytest.raises(TokenizerFitError, match="no captions"):
        fit_text_options(options, [{"png": b"x"}])
    with pytest.raises(ValueError, match="vocab_size"):
        _fit_options(vocab_size=100)
