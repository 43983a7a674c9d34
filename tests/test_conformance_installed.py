"""Every installed modality plugin passes the conformance suite (parametrised over the registry).

Discovery happens at collection; with ``PEACE_STRICT_PLUGINS=1`` (as under ``make test``) a broken
installed plugin makes this module fail to collect, naming the plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peace_registry import get_registry
from peace_registry.conformance import CHECKS, ConformanceSubject

MODALITIES = get_registry().modalities()
FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
#: Official resources that default options look up through the environment, and where the shared
#: fixtures hold a copy (the official GPT-2 BPE files are not redistributed with the code).
RESOURCE_ENV = {"PEACE_GPT2_BPE_DIR": FIXTURES / "gpt2_bpe"}


@pytest.fixture(scope="module", autouse=True)
def official_resources() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for variable, path in RESOURCE_ENV.items():
            if path.is_dir() and variable not in os.environ:
                patch.setenv(variable, str(path.resolve()))
        yield


@pytest.fixture(scope="module")
def subjects() -> dict[str, ConformanceSubject]:
    return {name: ConformanceSubject(get_registry(), name) for name in MODALITIES}


@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
@pytest.mark.parametrize("modality", MODALITIES)
def test_installed_modality_conforms(
    modality: str,
    check: Callable[[ConformanceSubject], object],
    subjects: dict[str, ConformanceSubject],
) -> None:
    if check(subjects[modality]) is False:
        pytest.skip(f"{modality}: nothing registered for this check")
