"""Hook specifications of the ``peace`` pluggy project.

Registration hooks receive a ``register`` callback and call it once per component. They are never
``firstresult``: every plugin's registrations are collected and no plugin wins by load order; two
distributions registering the same component is an error naming both. Only the checkpoint converter
is ``firstresult`` ("who handles this file").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from peace_registry.contract import ConvertedCheckpoint, Register

if TYPE_CHECKING:
    from peace_registry.registry import Registry

PROJECT_NAME = "peace"
ENTRY_POINT_GROUP = "peace.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def peace_register_modalities(register: Register) -> None:
    """Register :class:`~peace_registry.contract.ModalitySpec` objects."""


@hookspec
def peace_register_adapters(register: Register) -> None:
    """Register :class:`~peace_registry.contract.AdapterSpec` objects (one per modality)."""


@hookspec
def peace_register_ffns(register: Register) -> None:
    """Register :class:`~peace_registry.contract.FFNSpec` objects.

    Optional per modality: without one, the modality uses the core GeGLU + Sub-LN FFN.
    """


@hookspec
def peace_register_maskers(register: Register) -> None:
    """Register :class:`~peace_registry.contract.MaskerSpec` objects (denoising masking)."""


@hookspec
def peace_register_preprocessors(register: Register) -> None:
    """Register :class:`~peace_registry.contract.PreprocessorSpec` objects."""


@hookspec
def peace_register_architectures(register: Register) -> None:
    """Register :class:`~peace_registry.contract.ArchitectureSpec` presets."""


@hookspec
def peace_register_datasets(register: Register) -> None:
    """Register :class:`~peace_registry.contract.DatasetSpec` synthetic dataset generators
    (API 1.3; ``peace data synth --kind NAME``)."""


@hookspec(firstresult=True)
def peace_convert_checkpoint(
    checkpoint: Mapping[str, Any], source: str, registry: Registry
) -> ConvertedCheckpoint | None:
    """Convert a foreign checkpoint (already safely loaded) into a native config + state dict.

    Return ``None`` when the checkpoint is not of a format this plugin handles. ``source`` names
    the file for messages. ``registry`` (API 1.2; take the argument only if you need it) is the
    registry converting, whose modalities say how their adapters appear in foreign formats
    (``ModalitySpec.foreign_adapters``).
    """
