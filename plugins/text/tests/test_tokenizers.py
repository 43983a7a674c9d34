"""The three tokenizers: official parity with tokens.json, byte fallback, trained BPE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from peace_text import (
    ByteTokenizer,
    OfficialTokenizerError,
    TextOptions,
    TokenizerMismatchError,
    TrainedTokenizer,
    build_tokenizer,
    official_tokenizer,
    text_options_for,
    train_tokenizer,
)
from peace_text.official import BPE_DIR_ENV

EOS = 2

# ---------------------------------------------------------------------------------------------
# official
# ---------------------------------------------------------------------------------------------


def test_official_reproduces_every_tokens_json_case(official, token_cases) -> None:
    assert len(token_cases) == 30
    texts = [case["text"] for case in token_cases]
    got_ids = official.encode(texts)
    got_bpe = official.bpe_ids(texts)
    wrong = [
        case["text"]
        for case, ids, bpe in zip(token_cases, got_ids, got_bpe)
        if ids != case["ids"] or bpe != case["gpt2_bpe_ids"]
    ]
    assert not wrong, f"cases that differ from the official pipeline: {wrong}"
    # one text at a time gives the same as the batch
    assert [official.encode([t])[0] for t in texts] == got_ids


def test_official_truncates_to_70_then_eos(official, token_cases) -> None:
    truncated = [case for case in token_cases if case["truncated"]]
    assert len(truncated) == 2
    for case in truncated:
        ids = official.encode([case["text"]])[0]
        assert len(ids) == 71 and ids[-1] == EOS and ids.count(EOS) == 1
    assert official.encode([""])[0] == [1437, EOS]


def test_official_vocab_is_dict_txt(official, bpe_dir: Path) -> None:
    lines = (bpe_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert official.vocab_size == 4 + len(lines) == 50264
    # line i of dict.txt -> model id i + 4
    first, tenth = (int(lines[i].split()[0]) for i in (0, 9))
    assert official.model_ids([first, tenth]) == [4, 13]
    assert official.dictionary[-3:] == ("madeupword0000", "madeupword0001", "madeupword0002")


def test_official_word_starts_follow_the_space_marked_pieces(official, token_cases) -> None:
    pieces_of = {
        i: p
        for p, i in json.loads(Path(official.source.bpe_dir, "encoder.json").read_text()).items()
    }
    for case in token_cases:
        (encoding,) = official.encode_with_word_starts([case["text"]])
        pieces = [pieces_of[i] for i in case["gpt2_bpe_ids"][:70]]
        expected = [i == 0 or p.startswith("Ġ") for i, p in enumerate(pieces)] + [False]
        assert encoding.ids == case["ids"]
        assert encoding.word_start == expected, case["text"]
    (dog,) = official.encode_with_word_starts(["A dog's tail"])
    assert dog.word_start == [True, True, False, True, False]  # Ġa Ġdog 's Ġtail </s>
    (tabs,) = official.encode_with_word_starts(["tab\tseparated"])
    assert tabs.word_start[0] and not any(tabs.word_start[1:])


def test_official_decode_inverts_encode(official) -> None:
    for text in ["A Dog on the beach.", "日本語のテキスト 🎉", "  spaced\tout\n", ""]:
        assert official.decode(official.encode([text])[0]) == text.lower()


def test_official_embedded_round_trip_needs_no_files(
    official, token_cases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BPE_DIR_ENV, raising=False)
    options = text_options_for(official)
    assert options.tokenizer.bpe_dir == official.source.bpe_dir
    embedded = options.model_copy(update={"tokenizer": official.to_options(embed=True)})
    assert embedded.tokenizer.bpe_dir is None and embedded.tokenizer.serialized
    restored = TextOptions.model_validate_json(embedded.model_dump_json())
    rebuilt = build_tokenizer(restored)
    texts = [case["text"] for case in token_cases]
    assert rebuilt.encode(texts) == official.encode(texts)
    assert rebuilt.to_options(embed=False).serialized == embedded.tokenizer.serialized


def _copy_bpe(bpe_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("encoder.json", "vocab.bpe", "dict.txt"):
        shutil.copy(bpe_dir / name, target / name)
    return target


def test_official_checks_sha256_and_maps_missing_ids_to_unk(bpe_dir: Path, tmp_path: Path) -> None:
    folder = _copy_bpe(bpe_dir, tmp_path / "bpe")
    lines = (folder / "dict.txt").read_text(encoding="utf-8").splitlines()
    # drop the line of GPT-2 id 262 (" the", model id 5): it becomes <unk>
    (folder / "dict.txt").write_text(
        "\n".join(line for line in lines if line.split()[0] != "262") + "\n", encoding="utf-8"
    )
    with pytest.raises(OfficialTokenizerError, match=r"sha256.*verify_sha256"):
        official_tokenizer(folder)
    altered = official_tokenizer(folder, verify_sha256=False)
    assert altered.vocab_size == 50263
    assert altered.encode(["the"]) == [[3, EOS]]
    assert altered.encode(["a"]) == [[9, EOS]]  # " a" (was 10) sat after the removed line


def test_official_missing_files_are_named(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(OfficialTokenizerError, match=r"lacks encoder\.json, vocab\.bpe, dict\.txt"):
        official_tokenizer(tmp_path)
    monkeypatch.delenv(BPE_DIR_ENV, raising=False)
    with pytest.raises(OfficialTokenizerError, match=f"bpe_dir.*{BPE_DIR_ENV}"):
        build_tokenizer(TextOptions())
    for bad in ("{}", "[1", '{"format": "peace-text-official-bpe/1", "dictionary": []}'):
        with pytest.raises(OfficialTokenizerError, match="official tokenizer: serialized"):
            build_tokenizer(TextOptions(tokenizer={"kind": "official", "serialized": bad}))


def test_default_options_find_official_files_through_the_environment(
    bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BPE_DIR_ENV, str(bpe_dir))
    tokenizer = build_tokenizer(TextOptions())
    assert tokenizer.encode(["a"]) == [[10, EOS]]
    assert tokenizer.to_options().bpe_dir is None  # the config stays portable
    # files named by the environment are always checked, whatever verify_sha256 says
    folder = _copy_bpe(bpe_dir, tmp_path / "bpe")
    with (folder / "dict.txt").open("a", encoding="utf-8") as handle:
        handle.write("extra 0\n")
    monkeypatch.setenv(BPE_DIR_ENV, str(folder))
    unchecked = TextOptions(tokenizer={"kind": "official", "verify_sha256": False})
    with pytest.raises(OfficialTokenizerError, match="sha256"):
        build_tokenizer(unchecked)


def test_official_vocab_mismatch_is_an_error(bpe_dir: Path) -> None:
    options = TextOptions(vocab_size=1000, tokenizer={"kind": "official", "bpe_dir": str(bpe_dir)})
    with pytest.raises(TokenizerMismatchError, match="vocab_size=50264"):
        build_tokenizer(options)


def test_tokenizers_reject_a_bare_string_or_non_strings() -> None:
    tokenizer = ByteTokenizer()
    with pytest.raises(TypeError, match="wrap it in a list"):
        tokenizer.encode("hello")
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenizer.encode(["ok", 5])


# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_word_starts() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 260
    (encoding,) = tokenizer.encode_with_word_starts(["A dög"])
    data = "a dög".encode()
    assert encoding.ids == [4 + b for b in data] + [EOS]
    #                       a     ' '   d      ö(2 bytes)    g      EOS
    assert encoding.word_start == [True, True, False, False, False, False, False]
    assert tokenizer.encode([""]) == [[EOS]]
    assert ByteTokenizer(lowercase=False).encode(["A"]) == [[4 + ord("A"), EOS]]
    long = tokenizer.encode(["é" * 10_000])[0]
    assert len(long) == 71 and long[-1] == EOS
    assert tokenizer.decode(tokenizer.encode(["emoji 🎉"])[0]) == "emoji 🎉"


def test_byte_tokenizer_round_trips_through_options_json() -> None:
    options = text_options_for(ByteTokenizer(max_tokens=20, lowercase=False))
    assert options.vocab_size == 260 and options.tokenizer.kind == "bytes"
    restored = TextOptions.model_validate(json.loads(options.model_dump_json()))
    texts = ["Hello World", "日本語 🐶", "", "x" * 100]
    assert build_tokenizer(restored).encode(texts) == ByteTokenizer(
        max_tokens=20, lowercase=False
    ).encode(texts)


def test_byte_options_check_the_vocabulary() -> None:
    with pytest.raises(ValidationError, match="set vocab_size=260"):
        TextOptions(tokenizer={"kind": "bytes"})


# ---------------------------------------------------------------------------------------------
# trained
# ---------------------------------------------------------------------------------------------

CORPUS = [
    "a dog runs on the beach",
    "the dog sleeps on the sofa",
    "a cat sleeps on the red sofa",
    "the cat and the dog play on the beach",
    "Two dogs and two cats",
] * 20


@pytest.fixture(scope="module")
def trained() -> TrainedTokenizer:
    return train_tokenizer(CORPUS, vocab_size=300, max_tokens=16)


def test_trained_tokenizer_has_the_specials_and_merges(trained: TrainedTokenizer) -> None:
    assert 260 < trained.vocab_size <= 300
    assert [trained.bpe.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    (dog,) = trained.encode_with_word_starts(["The dog"])
    assert len(dog.ids) == 3  # learned merges: "Ġthe" and "Ġdog" are single pieces
    assert dog.word_start == [True, True, False]
    # special-token strings typed in text are plain text, never special ids
    ids = trained.encode(["<pad> </s> <s> <unk>"])[0]
    assert all(i >= 4 for i in ids[:-1]) and ids[-1] == EOS
    long = trained.encode(["dog " * 100])[0]
    assert len(long) == 17 and long[-1] == EOS
    assert trained.decode(trained.encode(["the cat 🎉"])[0]) == "the cat 🎉"


def test_trained_tokenizer_round_trips_through_options_json(trained: TrainedTokenizer) -> None:
    options = text_options_for(trained, bucket_size=16)
    assert options.vocab_size == trained.vocab_size and options.max_tokens == 16
    restored = TextOptions.model_validate_json(options.model_dump_json())
    rebuilt = build_tokenizer(restored)
    texts = ["a dog runs", "Unseen wörds 🐶 and tabs\there", "", "the " * 40]
    assert rebuilt.encode_with_word_starts(texts) == trained.encode_with_word_starts(texts)
    assert isinstance(rebuilt, TrainedTokenizer)


def test_trained_options_are_checked(trained: TrainedTokenizer) -> None:
    serialized = trained.to_options().serialized
    with pytest.raises(ValidationError, match=f"set vocab_size={trained.vocab_size}"):
        TextOptions(tokenizer={"kind": "trained", "serialized": serialized})
    with pytest.raises(ValidationError, match="not valid JSON"):
        TextOptions(vocab_size=300, tokenizer={"kind": "trained", "serialized": "{oops"})
    data = json.loads(serialized)
    data["model"]["vocab"]["<pad>"], data["model"]["vocab"]["<s>"] = 0, 1
    with pytest.raises(ValidationError, match="'<s>' must have id 0"):
        TextOptions(vocab_size=300, tokenizer={"kind": "trained", "serialized": json.dumps(data)})
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match="training text 1 is a bytes"):
        train_tokenizer(["ok", b"bytes"], vocab_size=270)
