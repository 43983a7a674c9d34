"""The official tokenizer's BPE (``tokenizers``) against a plain-Python GPT-2 BPE, on random text.

The reference follows GPT-2's published algorithm: split with GPT-2's pattern, map bytes to
printable characters, then repeatedly merge the adjacent pair of lowest merge rank. Characters whose
class differs between regex engines (rare control "whitespace") are left out of the random text.
"""

from __future__ import annotations

import itertools
import json
import random
import unicodedata
from functools import lru_cache
from pathlib import Path

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
WHITESPACE = " \t\n\r\x0b\x0c\u3000\u2003\xa0"


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def _is_space(ch: str) -> bool:
    return ch in WHITESPACE


def _run(text: str, start: int, accept) -> int:
    end = start
    while end < len(text) and accept(text[end]):
        end += 1
    return end


def split_like_gpt2(text: str) -> list[str]:
    """GPT-2's pre-tokenizer pattern, as a hand-written scanner (alternatives in pattern order)."""
    pieces, at = [], 0
    other = lambda ch: not (_is_space(ch) or _is_letter(ch) or _is_number(ch))  # noqa: E731
    while at < len(text):
        match = next((c for c in CONTRACTIONS if text.startswith(c, at)), None)
        if match:
            pieces.append(match)
            at += len(match)
            continue
        body = at + 1 if text[at] == " " and at + 1 < len(text) else at
        end = None
        for accept in (_is_letter, _is_number, other):
            if body < len(text) and accept(text[body]):
                end = _run(text, body, accept)
                break
        if end is None:  # whitespace: leave the last space for the next word unless at the end
            run_end = _run(text, at, _is_space)
            end = run_end if run_end == len(text) or run_end - at == 1 else run_end - 1
        pieces.append(text[at:end])
        at = end
    return pieces


def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    def __init__(self, folder: Path) -> None:
        self.encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines) if line}
        self.chars = byte_to_char()
        self.merge = lru_cache(maxsize=None)(self._merge)

    def _merge(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, index = [], 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    merged.append(parts[index] + parts[index + 1])
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in split_like_gpt2(text):
            word = "".join(self.chars[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.merge(word))
        return ids


ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz0123456789")
    + list(".,;:!?'\"-_()[]{}<>/@#$%^&*+=~`|\\")
    + list("éèüößçñåøœæ")
    + list("日本語の中文한국어")
    + list("αβγδλΩ")
    + ["🎉", "🐶", "👍🏽", "²", "½", "Ⅻ"]
    + list(WHITESPACE)
    + ["'s", "'ll", "'re", "'d", "  ", "   ", "\n\n"]
)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))


def test_reference_scanner_agrees_with_the_fixture(official, token_cases) -> None:
    reference = ReferenceBPE(Path(official.source.bpe_dir))
    for case in token_cases:
        assert reference.encode(" " + case["text"].lower()) == case["gpt2_bpe_ids"], case["text"]


def test_tokenizers_bpe_matches_the_reference_on_random_text(official) -> None:
    reference = ReferenceBPE(Path(official.source.bpe_dir))
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(1500)]
    got = official.bpe_ids(texts)
    wrong = [t for t, ids in zip(texts, got) if ids != reference.encode(" " + t.lower())]
    assert not wrong, f"{len(wrong)} texts differ, e.g. {wrong[:3]!r}"
