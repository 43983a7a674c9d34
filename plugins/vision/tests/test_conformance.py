"""The registry's conformance suite, run against the installed vision plugin."""

from __future__ import annotations

from peace_registry.conformance import ModalityConformance


class TestVisionConformance(ModalityConformance):
    modality = "vision"
