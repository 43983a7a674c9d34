"""Entry module of the audio plugin (``peace.plugins`` entry point ``audio``).

Only cheap imports here: torch, torchaudio and soundfile are imported inside the factories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peace_audio import official_keys
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

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn

    from peace_audio.masking import AudioBlockMasker
    from peace_audio.preprocess import AudioPreprocessor

PEACE_PLUGIN_API = "1.4"

#: The tiny preset (CPU tests, the demo, CPU recipes): 8 kHz audio (speech and most sounds stay
#: recognisable below 4 kHz, at half the cost of 16 kHz) through a light 32-channel extractor
#: (40 ms frames) and a one-layer positional conv, clips up to 5 s.
TINY_OPTIONS = {
    "sample_rate": 8000,
    "feature_layers": [[32, 20, 10], [32, 8, 4], [32, 4, 4], [32, 2, 2]],
    "conv_pos_depth": 1,
    "conv_pos_width": 9,
    "bucket_size": 64,
    "max_duration": 5.0,
}

MODALITY = "audio"


def _options(options: BaseModel):
    from peace_audio.options import AudioOptions

    if not isinstance(options, AudioOptions):
        raise TypeError(
            f"audio plugin: expected AudioOptions, got {type(options).__name__}; validate the "
            "modality's option dict with AudioOptions first"
        )
    return options


def build_adapter(ctx: BuildContext) -> nn.Module:
    from peace_audio.adapter import AudioAdapter

    return AudioAdapter(
        ctx.dim,
        ctx.heads,
        _options(ctx.options),
        num_bias_tables=ctx.num_bias_tables,
        eps=ctx.norm_eps,
        device=ctx.device,
        dtype=ctx.dtype,
    )


def build_masker(ctx: BuildContext) -> AudioBlockMasker:
    from peace_audio.masking import AudioBlockMasker

    return AudioBlockMasker(_options(ctx.options))


def build_preprocessor(options: BaseModel) -> AudioPreprocessor:
    from peace_audio.preprocess import AudioPreprocessor

    return AudioPreprocessor(_options(options))


@hookimpl
def peace_register_modalities(register: Register) -> None:
    from peace_audio.options import AudioOptions

    register(
        ModalitySpec(
            name=MODALITY,
            description="16 kHz audio clips (ONE-PEACE A-adapter: conv features + conv positions)",
            input_keys=("waveform", "lengths"),
            file_extensions=("wav", "flac", "ogg", "mp3"),
            options=AudioOptions,
            # The official 512-channel extractor is slow to run on a CPU for every check.
            check_options={"feature_layers": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2},
            # The large presets trade an extractor recompute for its activations (training only).
            preset_options={
                "tiny": TINY_OPTIONS,
                "large": {"grad_checkpointing": True},
                "one-peace-4b": {"grad_checkpointing": True},
            },
            # The official checkpoint's "audio" adapter: its keys and options (peace convert).
            foreign_adapters={
                "one-peace": ForeignAdapter(
                    "audio",
                    official_keys.map_key,
                    official_keys.infer_options,
                    ignore=official_keys.IGNORED,
                )
            },
        )
    )


@hookimpl
def peace_register_adapters(register: Register) -> None:
    register(AdapterSpec(modality=MODALITY, build=build_adapter))


@hookimpl
def peace_register_maskers(register: Register) -> None:
    register(MaskerSpec(modality=MODALITY, build=build_masker))


@hookimpl
def peace_register_preprocessors(register: Register) -> None:
    register(PreprocessorSpec(modality=MODALITY, build=build_preprocessor))
