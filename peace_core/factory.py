"""Building, saving and loading models (``create_model``, ``from_pretrained``, ...)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from peace_core.checkpoint import CheckpointError, is_native, read_checkpoint, write_checkpoint
from peace_core.config import EncoderConfig, ModelConfig
from peace_core.model import ModelConfigError, PeaceModel
from peace_registry import Registry, get_registry
from peace_registry.contract import ConvertedCheckpoint


def list_models(registry: Registry | None = None) -> list[str]:
    """Names of the registered architecture presets."""
    return sorted((registry or get_registry()).architectures())


def list_modalities(registry: Registry | None = None) -> list[str]:
    """Names of the modalities whose plugins loaded."""
    return sorted((registry or get_registry()).modalities())


def resolve_config(
    name_or_config: str | ModelConfig | Mapping[str, Any],
    modalities: Sequence[str] | None = None,
    registry: Registry | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A validated :class:`ModelConfig` from a preset name, a config, or a dict.

    ``modalities`` keeps a subset of the configured modalities, or adds ones the config does not
    mention (they get their plugin's default options). A preset that names no modalities gets
    every installed one. ``options`` changes some fields of some modalities' option dicts
    (``{"vision": {"image_size": 128}}``). ``overrides`` set encoder fields (``depth=4``) or
    top-level fields (``name="mine"``). This is the one place a model config is resolved.
    """
    registry = registry or get_registry()
    if isinstance(name_or_config, str):
        raw = dict(registry.architecture(name_or_config).config)
        raw.setdefault("name", name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        raw = name_or_config.model_dump()
    elif isinstance(name_or_config, Mapping):
        raw = dict(name_or_config)
    else:
        raise TypeError(
            "create_model expects a preset name, a ModelConfig or a dict, got "
            f"{type(name_or_config).__name__}"
        )
    raw = {**raw, "encoder": dict(raw.get("encoder") or {})}
    for key, value in overrides.items():
        if key == "variants":  # per modality and kind, over the config's own choices
            chosen = {name: dict(kinds) for name, kinds in (raw.get("variants") or {}).items()}
            for name, kinds in dict(value).items():
                chosen[name] = {**chosen.get(name, {}), **kinds}
            raw["variants"] = chosen
        elif key in EncoderConfig.model_fields:
            raw["encoder"][key] = value
        elif key in ModelConfig.model_fields:
            raw[key] = value
        else:
            valid = sorted(set(EncoderConfig.model_fields) | set(ModelConfig.model_fields))
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelConfigError(f"unknown model option {key!r}{hint}; valid: {', '.join(valid)}")
    configured = dict(raw.get("modalities") or {})
    if modalities is None and isinstance(name_or_config, str) and not configured:
        modalities = registry.modalities()
    if modalities is not None:
        names = list(dict.fromkeys(modalities))
        for name in names:
            registry.modality(name)  # unknown or failed plugins raise a clear error here
        raw["modalities"] = {name: configured.get(name, {}) for name in names}
    else:
        available = set(registry.modalities())
        missing = [name for name in configured if name not in available]
        if missing:
            registry.modality(missing[0])  # raises: says whether it failed or is unknown
    if isinstance(name_or_config, str):
        # Each plugin's options for this preset, under what the preset itself sets.
        raw["modalities"] = {
            name: {
                **registry.modality(name).preset_options.get(name_or_config, {}),
                **(options or {}),
            }
            for name, options in raw["modalities"].items()
        }
    if options:
        unknown = sorted(set(options) - set(raw["modalities"]))
        if unknown:
            raise ModelConfigError(
                f"options name modalities {unknown} that the model does not have; it has "
                f"{sorted(raw['modalities'])}"
            )
        raw["modalities"] = {
            name: {**current, **options.get(name, {})}
            for name, current in raw["modalities"].items()
        }
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ModelConfigError(f"invalid model config: {err}") from err


def create_model(
    name_or_config: str | ModelConfig | Mapping[str, Any] = "tiny",
    modalities: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    registry: Registry | None = None,
    **overrides: Any,
) -> PeaceModel:
    """Build a freshly initialised model from a preset name, a config or a dict."""
    registry = registry or get_registry()
    config = resolve_config(name_or_config, modalities, registry, **overrides)
    return PeaceModel(config, registry=registry, device=device, dtype=dtype)


def save_pretrained(model: PeaceModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a native checkpoint (``.safetensors`` recommended, or ``.pt``)."""
    return write_checkpoint(path, model.config.model_dump(mode="json"), model.state_dict())


def convert_checkpoint(
    path: str | os.PathLike[str], registry: Registry | None = None
) -> ConvertedCheckpoint:
    """Read any supported checkpoint file as a native config + state dict (nothing is built)."""
    registry = registry or get_registry()
    checkpoint = read_checkpoint(path)
    if is_native(checkpoint):
        if not checkpoint.get("config"):
            raise CheckpointError(f"{os.fspath(path)!r} is a native checkpoint without a config")
        state = dict(checkpoint["state_dict"])
        return ConvertedCheckpoint(
            config=dict(checkpoint["config"]),
            state_dict=state,
            mapped=list(state),
            source_format="peace",
        )
    # Raises CheckpointFormatError naming the converters tried when none recognises the file.
    return registry.convert_checkpoint(checkpoint, os.fspath(path))


def from_pretrained(
    path: str | os.PathLike[str],
    modalities: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    registry: Registry | None = None,
) -> PeaceModel:
    """Load a native or converted foreign checkpoint, optionally only some modalities.

    The model is built on the meta device and the checkpoint's tensors are assigned into it, so
    modalities that were not asked for are never materialised. ``strict=False`` allows keys missing
    from the file (they keep a fresh initialisation and are listed in a warning), e.g. the heads
    absent from a vision-only backbone file.
    """
    registry = registry or get_registry()
    return model_from_converted(
        convert_checkpoint(path, registry),
        modalities,
        dtype=dtype,
        device=device,
        strict=strict,
        registry=registry,
        source=os.fspath(path),
    )


def model_from_converted(
    converted: ConvertedCheckpoint,
    modalities: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    registry: Registry | None = None,
    source: str = "checkpoint",
) -> PeaceModel:
    """Build a model from an already converted checkpoint (see :func:`from_pretrained`)."""
    registry = registry or get_registry()
    config = resolve_config(converted.config, modalities, registry)
    model = PeaceModel(config, registry=registry, device="meta")
    state = _select_state(converted.state_dict, model, dtype)
    _check_shapes(state, model)
    missing, unexpected = _missing_unexpected(state, model)
    if unexpected:
        raise CheckpointError(
            f"{source!r} holds {len(unexpected)} key(s) the model does not have: "
            + ", ".join(unexpected[:20])
        )
    if missing and strict:
        raise CheckpointError(
            f"{source!r} lacks {len(missing)} key(s) the model needs: "
            + ", ".join(missing[:20])
            + "; pass strict=False to keep them freshly initialised"
        )
    if missing:
        model = _materialise_missing(model, config, registry, missing, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    still_meta = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    ]
    if still_meta:  # a component keeping state outside its state dict cannot be built lazily
        raise CheckpointError(
            f"{source!r}: these tensors have no value after loading (a component keeps state "
            f"outside its state dict): {', '.join(still_meta[:10])}"
        )
    model.to(device=device, dtype=dtype)
    return model.eval()


def _select_state(
    state: Mapping[str, torch.Tensor], model: PeaceModel, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Drop tensors of modalities the model was not built with; cast floats to ``dtype``."""
    dropped = {m for m in _modalities_in(state) if m not in model.modalities}
    selected = {}
    for key, value in state.items():
        if _key_modality(key) in dropped:
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        selected[key] = value
    return selected


def _key_modality(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] in ("adapters", "projections"):
        return parts[1]
    if parts[:2] == ["encoder", "final_norms"]:
        return parts[2]
    if parts[0] == "encoder" and len(parts) > 4 and parts[3] == "ffns":
        return parts[4]
    return None


def _modalities_in(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {m for m in map(_key_modality, state) if m is not None}


def _check_shapes(state: Mapping[str, torch.Tensor], model: PeaceModel) -> None:
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint has {tuple(value.shape)}, the model "
                f"expects {tuple(expected[key].shape)}"
            )


def _missing_unexpected(
    state: Mapping[str, torch.Tensor], model: PeaceModel
) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _materialise_missing(
    model: PeaceModel,
    config: ModelConfig,
    registry: Registry,
    missing: list[str],
    dtype: torch.dtype | None,
) -> PeaceModel:
    """Give keys absent from the file real, freshly initialised values (warned about)."""
    import warnings

    warnings.warn(
        f"{len(missing)} key(s) were not in the checkpoint and keep a fresh initialisation: "
        + ", ".join(missing[:10]),
        stacklevel=3,
    )
    fresh = PeaceModel(config, registry=registry, dtype=dtype).state_dict()
    model.load_state_dict({key: fresh[key] for key in missing}, strict=False, assign=True)
    return model
