"""The registry's conformance suite, run against the installed plugin (found by its entry point)."""

from __future__ import annotations

from peace_registry.conformance import ModalityConformance


class TestSignalConformance(ModalityConformance):
    modality = "signal"
