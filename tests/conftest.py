"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peace_core import gemm
from peace_registry.testing import on_sys_path


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for throwaway distributions; non-strict unless a test says so
    (a module may define its own ``root``, e.g. a strict one)."""
    monkeypatch.delenv("PEACE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("PEACE_DISABLE_PLUGINS", raising=False)
    with on_sys_path(tmp_path / "site") as path:
        yield path


@pytest.fixture
def backend() -> Iterator[Callable[[str], str]]:
    """``gemm.set_cpu_gemm`` for one test; the process's choice is restored afterwards."""
    saved = dict(gemm._state)
    yield gemm.set_cpu_gemm
    gemm._state.clear()
    gemm._state.update(saved)
