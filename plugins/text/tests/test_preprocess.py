"""Text preprocessing: raw items, odd strings, collate, webdataset decoders, examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peace_text import (
    ByteTokenizer,
    TextInputError,
    TextOptions,
    TextPreprocessor,
    TokenizerMismatchError,
    decode_json,
    decode_txt,
    text_options_for,
)


@pytest.fixture(scope="module")
def byte_preprocessor() -> TextPreprocessor:
    return TextPreprocessor(text_options_for(ByteTokenizer()))


@pytest.fixture(scope="module")
def official_preprocessor(bpe_dir: Path) -> TextPreprocessor:
    return TextPreprocessor(TextOptions(tokenizer={"kind": "official", "bpe_dir": str(bpe_dir)}))


def test_strings_and_utf8_bytes_give_the_same_sample(byte_preprocessor) -> None:
    sample = byte_preprocessor("Dog 🐶")
    assert sample["tokens"].dtype == torch.long and sample["word_start"].dtype == torch.bool
    assert sample["tokens"].tolist() == [4 + b for b in "dog 🐶".encode()] + [2]
    assert sample["word_start"].tolist()[:4] == [True, False, False, True]
    for raw in ("Dog 🐶".encode(), bytearray("Dog 🐶".encode())):
        assert torch.equal(byte_preprocessor(raw)["tokens"], sample["tokens"])
    assert torch.equal(byte_preprocessor("Dog 🐶", train=True)["tokens"], sample["tokens"])


@pytest.mark.parametrize("item", [123, None, ["a list"], object()])
def test_non_text_inputs_are_type_errors_naming_the_type(byte_preprocessor, item) -> None:
    with pytest.raises(TypeError, match=type(item).__name__):
        byte_preprocessor(item)


def test_undecodable_bytes_are_named(byte_preprocessor) -> None:
    with pytest.raises(TextInputError, match="not UTF-8"):
        byte_preprocessor(b"\xff\xfe bad")


def test_odd_strings_with_the_official_tokenizer(official_preprocessor) -> None:
    assert official_preprocessor("")["tokens"].tolist() == [1437, 2]
    long = official_preprocessor("word " * 2000)["tokens"]  # 10 000 characters
    assert len(long) == 71 and long[-1] == 2 and (long[:-1] != 2).all()
    emoji = official_preprocessor("🎉🐶👍🏽")["tokens"]
    assert emoji[-1] == 2 and len(emoji) > 3 and (emoji < 50264).all()
    spaces = official_preprocessor(" \t\n  \u3000 ")
    assert spaces["tokens"][-1] == 2 and spaces["word_start"][0]
    control = official_preprocessor("nul\x00 and bell\x07")
    assert control["tokens"][-1] == 2


def test_collate_pads_with_pad_id_and_false_word_starts(byte_preprocessor) -> None:
    samples = [byte_preprocessor(t) for t in ("abc", "", "a b")]
    batch = byte_preprocessor.collate(samples)
    assert set(batch) == {"tokens", "word_start"}
    assert batch["tokens"].tolist() == [
        [4 + 97, 4 + 98, 4 + 99, 2],
        [2, 1, 1, 1],
        [4 + 97, 4 + 32, 4 + 98, 2],
    ]
    assert batch["word_start"].tolist() == [
        [True, False, False, False],
        [False, False, False, False],
        [True, True, False, False],
    ]
    direct = byte_preprocessor.batch(["abc", "", "a b"])
    assert all(torch.equal(direct[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="empty list"):
        byte_preprocessor.collate([])
    with pytest.raises(KeyError, match="word_start"):
        byte_preprocessor.collate([{"tokens": torch.tensor([2])}])


def test_webdataset_decoders(byte_preprocessor) -> None:
    assert set(byte_preprocessor.decoders) >= {"txt", "json"}
    assert decode_txt("\ufeffA caption\r\n".encode()) == "A caption"
    assert decode_txt(b"  spaced  \n") == "  spaced  "
    assert decode_json(json.dumps({"caption": "a dog", "text": "other"}).encode()) == "a dog"
    assert decode_json(json.dumps({"text": "a cat", "id": 3}).encode()) == "a cat"
    assert decode_json(json.dumps({"caption": ["first", "second"]}).encode()) == "first"
    with pytest.raises(TextInputError, match=r"caption or text, found \['id', 'url'\]"):
        decode_json(json.dumps({"id": 3, "url": "x"}).encode())
    with pytest.raises(TextInputError, match="does not parse"):
        decode_json(b"{not json")
    with pytest.raises(TextInputError, match="not UTF-8"):
        decode_txt(b"\xff")
    sample = byte_preprocessor(byte_preprocessor.decoders["json"](b'{"caption": "Hi"}'))
    assert sample["tokens"].tolist() == [4 + ord("h"), 4 + ord("i"), 2]


def test_examples_are_varied_valid_and_deterministic(byte_preprocessor) -> None:
    items = byte_preprocessor.examples(8, seed=3)
    assert len(items) == 8 and all(isinstance(t, str) for t in items)
    assert items == byte_preprocessor.examples(8, seed=3)
    assert items != byte_preprocessor.examples(8, seed=4)
    lengths = {len(byte_preprocessor(t)["tokens"]) for t in items}
    assert len(lengths) >= 3
    assert max(lengths) == byte_preprocessor.options.max_tokens + 1  # one is truncated
    assert min(lengths) <= 2


def test_preprocessor_checks_the_vocabulary(bpe_dir: Path) -> None:
    options = TextOptions(vocab_size=1000, tokenizer={"kind": "official", "bpe_dir": str(bpe_dir)})
    with pytest.raises(TokenizerMismatchError, match="vocab_size=50264"):
        TextPreprocessor(options)
    with pytest.raises(TypeError, match="TextOptions"):
        TextPreprocessor({"vocab_size": 260})
