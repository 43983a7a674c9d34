"""The registry's conformance suite, run against the installed text plugin.

The default options use the official tokenizer, whose BPE files are not shipped: the suite runs
once with the plugin's ``check_options`` (the byte tokenizer, no files) and once with the official
defaults, finding the files through ``PEACE_GPT2_BPE_DIR`` (skipped when the fixtures are absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from peace_registry.conformance import ModalityConformance
from peace_text.official import BPE_DIR_ENV

BPE_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "gpt2_bpe"


class TestTextConformanceBytes(ModalityConformance):
    modality = "text"


class TestTextConformanceOfficialDefaults(ModalityConformance):
    modality = "text"
    option_overrides: ClassVar[dict[str, Any]] = {
        "vocab_size": 50264,
        "tokenizer": {"kind": "official"},
    }

    @pytest.fixture(autouse=True)
    def _official_files(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        if not BPE_DIR.exists():
            pytest.skip(f"fixture {BPE_DIR} is absent")
        monkeypatch.setenv(BPE_DIR_ENV, str(BPE_DIR))
        yield
