"""The core's own plugin: architecture presets and the official ONE-PEACE checkpoint converter
(the fusion layers; each modality plugin maps its own adapter).

Registered through the ``peace.plugins`` entry point like any third-party plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peace_registry.contract import ArchitectureSpec, ConvertedCheckpoint, Register
from peace_registry.hookspecs import hookimpl
from peace_registry.registry import Registry

PEACE_PLUGIN_API = "1.2"


@hookimpl
def peace_register_architectures(register: Register) -> None:
    from peace_core.presets import PRESETS

    for name, preset in PRESETS.items():
        register(
            ArchitectureSpec(name=name, description=preset["description"], config=preset["config"])
        )


@hookimpl
def peace_convert_checkpoint(
    checkpoint: Mapping[str, Any], source: str, registry: Registry
) -> ConvertedCheckpoint | None:
    from peace_core.official import convert_official

    return convert_official(checkpoint, source, registry)
