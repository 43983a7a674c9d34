"""The registry's conformance suite, run against the installed text plugin.

The default options use the official tokenizer, whose BPE files are not shipped: the suite runs
once with the byte tokenizer (needs no files) and once with the defaults, finding the official
files through ``PEACE_GPT2_BPE_DIR`` (skipped when the fixtures are absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from peace_registry.conformance import ConformanceSubject, ModalityConformance
from peace_text import TextOptions
from peace_text.official import BPE_DIR_ENV

BPE_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "gpt2_bpe"


@dataclass
class _TextSubject(ConformanceSubject):
    text_options: dict[str, Any] = field(default_factory=dict)

    def options(self) -> BaseModel:
        return TextOptions.model_validate(self.text_options)


class _TextConformance(ModalityConformance):
    modality = "text"
    text_options: ClassVar[dict[str, Any]] = {}

    def subject(self) -> ConformanceSubject:
        registry = self.conformance_registry()
        key = (type(self), id(registry))
        cached = self._subjects.get(key)
        if cached is None or cached.registry is not registry:
            cached = _TextSubject(
                registry, self.modality, self.batch_size, self.seed, text_options=self.text_options
            )
            self._subjects[key] = cached
        return cached


class TestTextConformanceBytes(_TextConformance):
    text_options: ClassVar[dict[str, Any]] = {"vocab_size": 260, "tokenizer": {"kind": "bytes"}}


class TestTextConformanceOfficialDefaults(_TextConformance):
    @pytest.fixture(autouse=True)
    def _official_files(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        if not BPE_DIR.exists():
            pytest.skip(f"fixture {BPE_DIR} is absent")
        monkeypatch.setenv(BPE_DIR_ENV, str(BPE_DIR))
        yield
