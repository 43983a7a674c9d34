"""ONE-PEACE's tokenizer: GPT-2 byte-level BPE, then the fairseq dictionary (spec §1.3).

Pipeline (the hub's, which ``tokens.json`` follows): lower-case, prepend one space, GPT-2 BPE
(``encoder.json`` + ``vocab.bpe``; ``tokenizers``' BPE with the ByteLevel pre-tokenizer and no added
prefix space), map every GPT-2 id through ``dict.txt`` (line i -> model id i + 4; an id missing
from it -> ``<unk>``), keep the first 70, append EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from peace_text.options import SPECIAL_TOKENS, UNK_ID, OfficialTokenizerOptions
from peace_text.tokenizer_base import NON_TEXT_IDS, ByteLevelBPETokenizer

ENCODER_FILE, MERGES_FILE, DICT_FILE = "encoder.json", "vocab.bpe", "dict.txt"
OFFICIAL_FILES = (ENCODER_FILE, MERGES_FILE, DICT_FILE)

#: sha256 of the files in ONE-PEACE's ``one_peace/utils/BPE`` (commit 71cfadf).
OFFICIAL_SHA256 = {
    DICT_FILE: "2c31c5b236661067fe8626775eb995ef5fe808ac87d2ad4a6ddbef68550f5cc6",
    ENCODER_FILE: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    MERGES_FILE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

#: Environment variable naming a folder with the official files (always sha256-checked).
BPE_DIR_ENV = "PEACE_GPT2_BPE_DIR"

_SERIALIZED_FORMAT = "peace-text-official-bpe/1"


class OfficialTokenizerError(ValueError):
    """The official tokenizer's files are missing, altered or malformed."""


def _byte_level_bpe(model: models.BPE) -> Tokenizer:
    bpe = Tokenizer(model)
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_dictionary(path: Path) -> list[str]:
    """The symbols of a fairseq ``dict.txt`` (``<symbol> <count>`` per line), in order."""
    symbols = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        symbol, _, count = line.rstrip().rpartition(" ")
        if not symbol or not count.isdigit():
            raise OfficialTokenizerError(
                f"{path}:{number}: expected '<symbol> <count>', found {line!r:.60}"
            )
        symbols.append(symbol)
    duplicates = [symbol for symbol, times in Counter(symbols).items() if times > 1]
    if duplicates:
        raise OfficialTokenizerError(f"{path}: repeated symbols {sorted(duplicates)[:5]}")
    return symbols


def resolve_bpe_dir(bpe_dir: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The folder to read and whether it came from the environment (then it must be official)."""
    from_env = bpe_dir is None
    if from_env:
        bpe_dir = os.environ.get(BPE_DIR_ENV) or None
    if bpe_dir is None:
        raise OfficialTokenizerError(
            "the official text tokenizer needs ONE-PEACE's BPE files (encoder.json, vocab.bpe, "
            "dict.txt from OFA-Sys/ONE-PEACE one_peace/utils/BPE): set the text option "
            f"tokenizer.bpe_dir, or the {BPE_DIR_ENV} environment variable, or embed them with "
            "OfficialTokenizer.to_options(embed=True); or pick another tokenizer "
            "(tokenizer.kind 'bytes' or 'trained')"
        )
    folder = Path(bpe_dir).expanduser()
    missing = [name for name in OFFICIAL_FILES if not (folder / name).is_file()]
    if missing:
        raise OfficialTokenizerError(
            f"official text tokenizer: {folder} lacks {', '.join(missing)} (it needs "
            f"{', '.join(OFFICIAL_FILES)})"
        )
    return folder, from_env


def _check_sha256(folder: Path) -> None:
    for name, expected in OFFICIAL_SHA256.items():
        found = _sha256(folder / name)
        if found != expected:
            raise OfficialTokenizerError(
                f"{folder / name} has sha256 {found}, expected {expected} (ONE-PEACE's file); "
                "set tokenizer.verify_sha256=false and tokenizer.bpe_dir to use other GPT-2-style "
                "BPE files"
            )


def _file_stamp(folder: Path) -> tuple[tuple[int, int], ...]:
    return tuple(
        ((folder / n).stat().st_mtime_ns, (folder / n).stat().st_size) for n in OFFICIAL_FILES
    )


@lru_cache(maxsize=4)
def _load_files(
    folder: str, verify: bool, stamp: tuple[tuple[int, int], ...]
) -> tuple[Tokenizer, tuple[str, ...]]:
    del stamp  # part of the cache key only: edited files are read again
    path = Path(folder)
    if verify:
        _check_sha256(path)
    vocab, merges = models.BPE.read_file(str(path / ENCODER_FILE), str(path / MERGES_FILE))
    return _byte_level_bpe(models.BPE(vocab, merges)), tuple(read_dictionary(path / DICT_FILE))


@lru_cache(maxsize=4)
def _load_serialized(serialized: str) -> tuple[Tokenizer, tuple[str, ...]]:
    try:
        data = json.loads(serialized)
    except ValueError as err:
        raise OfficialTokenizerError(
            f"official tokenizer: serialized is not JSON ({err})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != _SERIALIZED_FORMAT:
        raise OfficialTokenizerError(
            f"official tokenizer: serialized is not in the {_SERIALIZED_FORMAT!r} format "
            "(make it with OfficialTokenizer.to_options(embed=True))"
        )
    dictionary, bpe = data.get("dictionary"), data.get("bpe")
    if not isinstance(dictionary, list) or not all(isinstance(s, str) for s in dictionary):
        raise OfficialTokenizerError("official tokenizer: serialized 'dictionary' is not a list")
    if not isinstance(bpe, dict):
        raise OfficialTokenizerError("official tokenizer: serialized lacks the 'bpe' tokenizer")
    return Tokenizer.from_str(json.dumps(bpe)), tuple(dictionary)


class OfficialTokenizer(ByteLevelBPETokenizer):
    """GPT-2 BPE + fairseq dictionary, as ONE-PEACE tokenizes text. Build it with
    :func:`official_tokenizer` or :meth:`from_options`."""

    kind: ClassVar[str] = "official"

    def __init__(
        self,
        bpe: Tokenizer,
        dictionary: Sequence[str],
        *,
        max_tokens: int = 70,
        lowercase: bool = True,
        source: OfficialTokenizerOptions | None = None,
    ) -> None:
        super().__init__(bpe, max_tokens=max_tokens, lowercase=lowercase)
        self.dictionary = tuple(dictionary)
        self.source = source
        pieces = bpe.get_vocab_size()
        # GPT-2 id -> model id, and back for decoding.
        self._to_model = [UNK_ID] * pieces
        for line, symbol in enumerate(self.dictionary):
            if symbol.isascii() and symbol.isdigit() and int(symbol) < pieces:
                self._to_model[int(symbol)] = line + len(SPECIAL_TOKENS)
        self._to_piece = {m: g for g, m in enumerate(self._to_model) if m != UNK_ID}

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.dictionary)

    def model_ids(self, piece_ids: Sequence[int]) -> list[int]:
        table = self._to_model
        return [table[i] for i in piece_ids]

    def piece_ids(self, model_ids: Sequence[int]) -> list[int]:
        return [
            self._to_piece[i] for i in model_ids if i not in NON_TEXT_IDS and i in self._to_piece
        ]

    def serialize(self) -> str:
        """Everything this tokenizer needs, as one JSON string (for ``to_options(embed=True)``)."""
        return json.dumps(
            {
                "format": _SERIALIZED_FORMAT,
                "bpe": json.loads(self.bpe.to_str()),
                "dictionary": list(self.dictionary),
            },
            ensure_ascii=False,
        )

    def to_options(self, *, embed: bool = False) -> OfficialTokenizerOptions:
        """The options this tokenizer was built from (files' folder, environment or embedded
        JSON); with ``embed=True`` the whole tokenizer as JSON, so that it needs no files."""
        source = self.source
        if embed or source is None:
            serialized = source.serialized if source is not None else None
            return OfficialTokenizerOptions(serialized=serialized or self.serialize())
        return source.model_copy()

    @classmethod
    def from_options(
        cls, options: OfficialTokenizerOptions, *, max_tokens: int = 70, lowercase: bool = True
    ) -> OfficialTokenizer:
        if options.serialized is not None:
            bpe, dictionary = _load_serialized(options.serialized)
        else:
            folder, from_env = resolve_bpe_dir(options.bpe_dir)
            verify = options.verify_sha256 or from_env
            bpe, dictionary = _load_files(str(folder.resolve()), verify, _file_stamp(folder))
        return cls(bpe, dictionary, max_tokens=max_tokens, lowercase=lowercase, source=options)


def official_tokenizer(
    bpe_dir: str | os.PathLike[str] | None = None,
    *,
    max_tokens: int = 70,
    lowercase: bool = True,
    verify_sha256: bool = True,
) -> OfficialTokenizer:
    """ONE-PEACE's tokenizer from a folder holding ``encoder.json``, ``vocab.bpe``, ``dict.txt``
    (``None``: the folder named by ``PEACE_GPT2_BPE_DIR``)."""
    options = OfficialTokenizerOptions(
        bpe_dir=None if bpe_dir is None else str(bpe_dir), verify_sha256=verify_sha256
    )
    return OfficialTokenizer.from_options(options, max_tokens=max_tokens, lowercase=lowercase)
