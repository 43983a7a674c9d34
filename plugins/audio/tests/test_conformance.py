"""The registry's conformance suite, run against the installed ``audio`` entry point.

The registry holds only that entry point (loaded strictly), so the suite tests this plugin as
installed while other plugins of the checkout cannot make it fail.
"""

from __future__ import annotations

from peace_registry.conformance import ModalityConformance
from peace_registry.discovery import entry_point_sources, load_plugins
from peace_registry.registry import Registry

_REGISTRY: Registry | None = None


def audio_entry_point_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        sources = [source for source in entry_point_sources() if source.name == "audio"]
        assert [source.dist for source in sources] == ["peace-audio"], (
            f"expected one 'audio' entry point from peace-audio, found {sources}"
        )
        _REGISTRY = Registry(load_plugins(sources, strict=True, disabled=()))
    return _REGISTRY


class TestAudioConformance(ModalityConformance):
    modality = "audio"

    def conformance_registry(self) -> Registry:
        return audio_entry_point_registry()
