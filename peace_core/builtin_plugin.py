"""The core's own plugin: architecture presets, the demo's synthetic dataset, and the official
ONE-PEACE checkpoint converter (the fusion layers; each modality plugin maps its own adapter).

Registered through the ``peace.plugins`` entry point like any third-party plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peace_registry.contract import (
    ArchitectureSpec,
    ConvertedCheckpoint,
    DatasetGenerator,
    DatasetSpec,
    Register,
)
from peace_registry.hookspecs import hookimpl
from peace_registry.registry import Registry

PEACE_PLUGIN_API = "1.3"


@hookimpl
def peace_register_architectures(register: Register) -> None:
    from peace_core.presets import PRESETS

    for name, preset in PRESETS.items():
        register(
            ArchitectureSpec(name=name, description=preset["description"], config=preset["config"])
        )


def _load_demo_dataset() -> DatasetGenerator:
    from peace_core.data.synth import SynthConfig, synthesize

    return DatasetGenerator(options=SynthConfig, generate=synthesize)


@hookimpl
def peace_register_datasets(register: Register) -> None:
    register(
        DatasetSpec(
            "demo",
            "the demo's images of shapes, sounds and captions (peace data synth OUT)",
            _load_demo_dataset,
        )
    )


@hookimpl
def peace_convert_checkpoint(
    checkpoint: Mapping[str, Any], source: str, registry: Registry
) -> ConvertedCheckpoint | None:
    from peace_core.official import convert_official

    return convert_official(checkpoint, source, registry)
