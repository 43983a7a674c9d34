"""Entry module of the plugin (``[project.entry-points."peace.plugins"]`` names it).

peace imports it to discover the plugin, so it stays cheap: only the contract and the pydantic
options here. torch and the component modules are imported inside the factories, when a model or
a preprocessor is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peace_registry import (
    AdapterSpec,
    BuildContext,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    Register,
    hookimpl,
)

from peace_template.options import SignalOptions

if TYPE_CHECKING:
    from torch import nn

    from peace_template.masking import SignalMasker
    from peace_template.preprocess import SignalPreprocessor

#: The plugin-API version this plugin was written against (``peace_registry.PLUGIN_API_VERSION``).
PEACE_PLUGIN_API = "1.1"

MODALITY = "signal"


def build_adapter(ctx: BuildContext) -> nn.Module:
    from peace_template.adapter import SignalAdapter

    return SignalAdapter(ctx)


def build_masker(ctx: BuildContext) -> SignalMasker:
    from peace_template.masking import SignalMasker

    return SignalMasker(ctx.options)


def build_preprocessor(options: SignalOptions) -> SignalPreprocessor:
    from peace_template.preprocess import SignalPreprocessor

    return SignalPreprocessor(options)


# Built once: registering the very same object again is a harmless no-op.
MODALITY_SPEC = ModalitySpec(
    name=MODALITY,
    description="fixed-channel 1-D signals (e.g. IMU windows), one token per frame of steps",
    input_keys=("signal", "frames"),
    file_extensions=("npy",),
    options=SignalOptions,
    check_options={"max_frames": 16},  # small sizes for the conformance suite
    preset_options={"tiny": {"max_frames": 64}},  # the CPU-sized "tiny" preset
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
