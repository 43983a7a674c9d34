"""Shared fixtures of the text plugin's tests: paths to the parity fixtures (skip when absent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

#: ``shared/fixtures`` beside the repository root.
FIXTURES = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures"
BPE_DIR = FIXTURES / "gpt2_bpe"
PARITY_DIR = FIXTURES / "one_peace_parity_a"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} is absent")
    return path


@pytest.fixture(scope="session")
def bpe_dir() -> Path:
    """ONE-PEACE's BPE files (encoder.json, vocab.bpe, dict.txt)."""
    return _require(BPE_DIR)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _require(PARITY_DIR)


@pytest.fixture(scope="session")
def token_cases(parity_dir: Path) -> list[dict[str, Any]]:
    """The 30 cases of tokens.json: text, gpt2_bpe_ids, ids (model ids incl. EOS)."""
    data = json.loads(_require(parity_dir / "tokens.json").read_text(encoding="utf-8"))
    return data["cases"]


@pytest.fixture(scope="session")
def official(bpe_dir: Path):
    from peace_text import official_tokenizer

    return official_tokenizer(bpe_dir)
