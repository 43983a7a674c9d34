"""Entry module of the plugin (``[project.entry-points."peace.plugins"]`` names it).

peace imports it to discover the plugin, so it stays cheap: only the contract and the pydantic
options here. torch, numpy and the component modules are imported inside the factories, when a
model or a preprocessor is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peace_registry import (
    AdapterSpec,
    BuildContext,
    DatasetGenerator,
    DatasetSpec,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    Register,
    hookimpl,
)

from peace_imu.options import ImuOptions

if TYPE_CHECKING:
    from torch import nn

    from peace_imu.masking import ImuSpanMasker
    from peace_imu.preprocess import ImuPreprocessor

#: The plugin-API version this plugin was written against (``peace_registry.PLUGIN_API_VERSION``).
PEACE_PLUGIN_API = "1.3"

MODALITY = "imu"


def build_adapter(ctx: BuildContext) -> nn.Module:
    from peace_imu.adapter import ImuAdapter

    return ImuAdapter(ctx)


def build_masker(ctx: BuildContext) -> ImuSpanMasker:
    from peace_imu.masking import ImuSpanMasker

    return ImuSpanMasker(ctx.options)


def build_preprocessor(options: ImuOptions) -> ImuPreprocessor:
    from peace_imu.preprocess import ImuPreprocessor

    return ImuPreprocessor(options)


# Built once: registering the very same object again is a harmless no-op.
MODALITY_SPEC = ModalitySpec(
    name=MODALITY,
    description="inertial windows (accelerometer + gyroscope, [T, 6]), one token per patch of "
    "samples",
    input_keys=("imu", "lengths"),
    file_extensions=("npy", "csv"),
    options=ImuOptions,
    check_options={"max_seconds": 2.0},  # small sizes for the conformance suite: 10 patches
    preset_options={"tiny": {"max_seconds": 4.0}},  # the CPU-sized "tiny" preset: 20 patches
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


# --------------------------------------------------------------------------------------------
def load_dataset() -> DatasetGenerator:
    from peace_imu.synth import ImuSynthOptions, generate

    return DatasetGenerator(options=ImuSynthOptions, generate=generate)


@hookimpl
def peace_register_datasets(register: Register) -> None:
    # Synthetic activity windows with captions: peace data synth --kind imu OUT.
    register(
        DatasetSpec(
            MODALITY,
            "synthetic hip-worn IMU windows of daily activities, captioned, unseen test subjects",
            load_dataset,
        )
    )


# --------------------------------------------------------------------------------------------
