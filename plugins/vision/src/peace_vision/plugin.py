"""Entry module of the vision plugin: registers the ``vision`` modality and its components.

Only cheap imports here (the contract and the pydantic options); torch, Pillow and the adapter
are imported inside the factories, when a model or preprocessor is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peace_registry.contract import (
    AdapterSpec,
    BuildContext,
    ForeignAdapter,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    Register,
)
from peace_registry.hookspecs import hookimpl
from peace_vision import official_keys
from peace_vision.options import VisionOptions

if TYPE_CHECKING:
    from torch import nn

    from peace_vision.masking import VisionMasker
    from peace_vision.preprocess import VisionPreprocessor

PEACE_PLUGIN_API = "1.2"

MODALITY = "vision"


def build_adapter(ctx: BuildContext) -> nn.Module:
    from peace_vision.adapter import VisionAdapter

    return VisionAdapter(ctx)


def build_masker(ctx: BuildContext) -> VisionMasker:
    from peace_vision.masking import build_vision_masker

    return build_vision_masker(ctx)


def build_preprocessor(options: Any) -> VisionPreprocessor:
    from peace_vision.preprocess import build_vision_preprocessor

    return build_vision_preprocessor(options)


# Created once, so a repeated registration is an identical (no-op) one.
MODALITY_SPEC = ModalitySpec(
    name=MODALITY,
    description=(
        "images (ONE-PEACE's 'image'): hMLP patch stem, 16-pixel patches, 2-D relative positions"
    ),
    input_keys=("pixels",),
    file_extensions=("jpg", "jpeg", "png", "webp"),
    options=VisionOptions,
    # The tiny preset (CPU tests, the demo, CPU recipes): 64-px images, 4x4 patches.
    preset_options={"tiny": {"image_size": 64}},
    # The official checkpoint's "image" adapter: its keys and options (peace convert).
    foreign_adapters={
        "one-peace": ForeignAdapter("image", official_keys.map_key, official_keys.infer_options)
    },
)
ADAPTER_SPEC = AdapterSpec(MODALITY, build_adapter)
MASKER_SPEC = MaskerSpec(MODALITY, build_masker)
PREPROCESSOR_SPEC = PreprocessorSpec(MODALITY, build_preprocessor)


@hookimpl
def peace_register_modalities(register: Register) -> None:
    register(MODALITY_SPEC)


@hookimpl
def peace_register_adapters(register: Register) -> None:
    register(ADAPTER_SPEC)


@hookimpl
def peace_register_maskers(register: Register) -> None:
    register(MASKER_SPEC)


@hookimpl
def peace_register_preprocessors(register: Register) -> None:
    register(PREPROCESSOR_SPEC)
