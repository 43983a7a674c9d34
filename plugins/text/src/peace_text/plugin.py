"""Entry module of the text plugin (``peace.plugins`` entry point ``text``).

Only cheap imports here: torch and tokenizers are imported inside the factories.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from peace_text import official_keys
from peace_text.options import TextOptions

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn

    from peace_text.masking import WholeWordMasker
    from peace_text.preprocess import TextPreprocessor

PEACE_PLUGIN_API = "1.5"

MODALITY = "text"


def _options(options: BaseModel) -> TextOptions:
    if not isinstance(options, TextOptions):
        raise TypeError(
            f"text plugin: expected TextOptions, got {type(options).__name__}; validate the "
            "modality's option dict with TextOptions first"
        )
    return options


def _fitted(options: BaseModel) -> TextOptions:
    text_options = _options(options)
    if text_options.needs_fit:
        from peace_text.tokenizer import build_tokenizer

        build_tokenizer(text_options)  # raises, saying how to fit the tokenizer first
    return text_options


def build_adapter(ctx: BuildContext) -> nn.Module:
    from peace_text.adapter import TextAdapter

    _fitted(ctx.options)
    return TextAdapter.from_context(ctx)


def build_masker(ctx: BuildContext) -> WholeWordMasker:
    from peace_text.masking import WholeWordMasker

    return WholeWordMasker.from_options(_options(ctx.options))


def build_preprocessor(options: BaseModel) -> TextPreprocessor:
    from peace_text.preprocess import TextPreprocessor

    return TextPreprocessor(_fitted(options))


def fit_options(options: BaseModel, samples: Iterable[Mapping[str, Any]]) -> BaseModel:
    from peace_text.fit import fit_text_options

    return fit_text_options(_options(options), samples)


@hookimpl
def peace_register_modalities(register: Register) -> None:
    register(
        ModalitySpec(
            name=MODALITY,
            description="text (ONE-PEACE L-adapter: GPT-2 BPE ids, learned positions)",
            input_keys=("tokens", "word_start"),
            file_extensions=("txt", "json"),
            options=TextOptions,
            # The official tokenizer needs ONE-PEACE's BPE files; self-checks use the byte one.
            check_options={"vocab_size": 260, "tokenizer": {"kind": "bytes"}},
            fit_options=fit_options,
            # The tiny preset needs no files: byte tokens (its recipes fit a BPE to the data).
            preset_options={
                "tiny": {
                    "vocab_size": 260,
                    "tokenizer": {"kind": "bytes"},
                    "max_positions": 130,
                    "bucket_size": 32,
                    "max_tokens": 96,
                }
            },
            # The official checkpoint's "text" adapter: its keys and options (peace convert).
            foreign_adapters={
                "one-peace": ForeignAdapter(
                    "text", official_keys.map_key, official_keys.infer_options
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
