"""The model a run trains: from a preset or config, or initialised from a checkpoint (the
previous stage's), with new modalities starting fresh; and the decoder carried over likewise."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from peace_core.checkpoint import read_checkpoint
from peace_core.config import EncoderConfig, ModelConfig
from peace_core.factory import (
    convert_checkpoint,
    create_model,
    model_from_converted,
    resolve_config,
)
from peace_core.model import PeaceModel
from peace_core.pretrain.config import ModelSection
from peace_core.pretrain.run_state import find_checkpoint
from peace_registry import Registry, get_registry
from peace_registry.contract import ConvertedCheckpoint

#: Encoder fields that must agree between ``model.preset``/``config`` and ``init_from``.
_STRUCTURAL_ENCODER_FIELDS = ("dim", "depth", "heads", "ffn_dim", "rel_pos_tables")

# --------------------------------------------------------------------------------------------
# Building the model


#: ``samples(modality)``: the raw training samples that hold ``modality`` (read lazily).
TrainingSamples = Callable[[str], Iterable[Mapping[str, Any]]]


def build_model(
    section: ModelSection,
    *,
    grad_checkpointing: bool = False,
    registry: Registry | None = None,
    samples: TrainingSamples | None = None,
) -> PeaceModel:
    """The model a :class:`ModelSection` describes (see its docstring), fp32, in train mode.

    With ``samples``, the options of every modality that starts fresh are first fitted to its
    training samples by its plugin (``ModalitySpec.fit_options``, e.g. a tokenizer).
    """
    registry = registry or get_registry()
    overrides = dict(section.overrides)
    if grad_checkpointing:
        overrides["grad_checkpointing"] = True
    if section.variants:
        overrides["variants"] = section.variants
    if section.init_from is None:
        config = resolve_config(
            section.architecture(),
            section.modalities,
            registry,
            options=section.options,
            **overrides,
        )
        config = fit_options(config, set(), registry, samples, section)
        return create_model(config, registry=registry).train()
    source = find_checkpoint(section.init_from)
    converted = convert_checkpoint(source, registry)
    config = resolve_config(
        _merge_init_config(section, converted.config, registry),
        section.modalities,
        registry,
        options=section.options,
        **overrides,
    )
    # Modalities the checkpoint holds keep the options their weights were trained with.
    config = fit_options(
        config, set(converted.config.get("modalities") or {}), registry, samples, section
    )
    merged = ConvertedCheckpoint(
        config=config.model_dump(mode="json"),
        state_dict=converted.state_dict,
        mapped=converted.mapped,
        ignored=converted.ignored,
        source_format=converted.source_format,
    )
    with warnings.catch_warnings():
        # New modalities are expected to be missing from the file: they start fresh.
        warnings.filterwarnings("ignore", message=r".*keep a fresh initialisation")
        model = model_from_converted(
            merged,
            section.modalities,
            dtype=torch.float32,
            strict=False,
            registry=registry,
            source=str(source),
        )
    return model.train()


def fit_options(
    config: ModelConfig,
    trained: set[str],
    registry: Registry,
    samples: TrainingSamples | None,
    section: ModelSection,
) -> ModelConfig:
    """``config`` with each fresh modality's options fitted to its training samples by its
    plugin (one that fits nothing returns its options unchanged).

    A modality in ``trained`` comes with weights from ``model.init_from``: its options cannot be
    fitted anew (a new tokenizer would not match the trained embeddings), so asking for that is
    an error instead of training on.
    """
    fitted_options = dict(config.modalities)
    for name, raw in config.modalities.items():
        spec = registry.modality(name)
        if spec.fit_options is None or (samples is None and name not in trained):
            continue
        options = spec.options.model_validate(raw)
        if name in trained:
            try:
                spec.fit_options(options, _NoSamples())
            except _DataNeededError:
                raise ValueError(
                    f"model.options.{name} asks for options fitted to the data, but {name!r} "
                    f"comes trained from model.init_from {section.init_from!r} with its own; "
                    f"drop that setting from model.options.{name}"
                ) from None
            continue
        fitted = spec.fit_options(options, samples(name))
        if fitted is not options:
            fitted_options[name] = fitted.model_dump(mode="json")
    return config.model_copy(update={"modalities": fitted_options})


class _DataNeededError(Exception):
    """Raised by :class:`_NoSamples` when a plugin starts reading samples to fit options."""


class _NoSamples:
    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        raise _DataNeededError


def _merge_init_config(
    section: ModelSection, checkpoint_config: Mapping[str, Any], registry: Registry
) -> dict[str, Any]:
    """The checkpoint's config, plus options for new modalities from ``preset``/``config``."""
    base = copy.deepcopy(dict(checkpoint_config))
    base["modalities"] = dict(base.get("modalities") or {})
    architecture = section.architecture()
    if architecture is None:
        return base
    reference: ModelConfig = resolve_config(architecture, registry=registry, **section.overrides)
    saved = EncoderConfig.model_validate(base.get("encoder") or {})
    differing = [
        f"{name} ({getattr(reference.encoder, name)} vs {getattr(saved, name)})"
        for name in _STRUCTURAL_ENCODER_FIELDS
        if getattr(reference.encoder, name) != getattr(saved, name)
    ]
    if differing:
        raise ValueError(
            f"model.init_from {section.init_from!r} has another encoder than the model "
            f"preset/config: {', '.join(differing)}; drop model.preset/config or make them match"
        )
    # Only modalities the run asks for and the checkpoint lacks take the reference's options.
    for name in section.modalities or []:
        if name not in base["modalities"] and name in reference.modalities:
            base["modalities"][name] = dict(reference.modalities[name])
    return base


def load_decoder_from(path: str | os.PathLike[str], decoder: nn.Module) -> int:
    """Copy the decoder tensors of a trainer checkpoint whose names and shapes match; return
    how many were copied (0 for files without a decoder, e.g. ``model.safetensors``)."""
    path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        return 0
    saved = read_checkpoint(path).get("decoder")
    if not isinstance(saved, Mapping):
        return 0
    own = decoder.state_dict()
    matching = {
        key: value
        for key, value in saved.items()
        if key in own and tuple(own[key].shape) == tuple(value.shape)
    }
    decoder.load_state_dict(matching, strict=False)
    return len(matching)
