"""Converter for official ONE-PEACE checkpoints (spec §6) into native config + state dict.

Handles the full pretrained/retrieval file (``encoder_wrapper.*`` + projections), fine-tuned files
(one relative-position table per layer, only some modalities, ``classify_head.*`` ignored) and the
vision-only file written by the official ``convert_to_vision.py`` (``encoder.*`` +
``image_adapter.*``).

The core maps only what it owns: the fusion layers, the per-modality GeGLU FFNs, final norms and
projections. Each modality's adapter keys and options come from its plugin
(``ModalitySpec.foreign_adapters["one-peace"]``), which also names the official modality it is
(the official "image" is the vision plugin's). An official modality no installed plugin claims is
left out with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from peace_registry import ForeignAdapter, Registry
from peace_registry.contract import ConvertedCheckpoint
from peace_registry.errors import PeaceError, PeaceWarning

#: The format name plugins key their ``foreign_adapters`` by.
FORMAT = "one-peace"
#: An official modality name in a key (``image`` in ``image_adapter.``, ``layers.3.image_ffn``).
_OFFICIAL = "([a-z]+)"


class OfficialCheckpointError(PeaceError, ValueError):
    """An official-looking checkpoint this converter cannot map."""


# Keys relative to the fusion model ("encoder_wrapper.fusion_model." or "encoder."). ``{m}`` in
# a target stands for the native modality of the official name captured as group ``m``.
_FUSION_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p + "$"), t)
    for p, t in [
        (r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
        (
            r"layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)",
            r"blocks.\1.attn.\2.\3",
        ),
        (r"layers\.(\d+)\.self_attn\.ln\.(weight|bias)", r"blocks.\1.attn.inner_norm.\2"),
        (r"layers\.(\d+)\.gamma_1", r"blocks.\1.attn_scale.gamma"),
        (r"layers\.(\d+)\.gamma_2", r"blocks.\1.ffn_scale.gamma"),
        (r"layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"blocks.\1.ffn_norm.\2"),
        (
            r"layers\.(\d+)\.(?P<m>[a-z]+)_ffn\.0\.(wi_0|wi_1)\.weight",
            r"blocks.\1.ffns.{m}.\3.weight",
        ),
        (
            r"layers\.(\d+)\.(?P<m>[a-z]+)_ffn\.2\.(weight|bias)",
            r"blocks.\1.ffns.{m}.norm.\3",
        ),
        (r"layers\.(\d+)\.(?P<m>[a-z]+)_ffn\.3\.(weight|bias)", r"blocks.\1.ffns.{m}.wo.\3"),
        (r"(?P<m>[a-z]+)_layer_norm\.(weight|bias)", r"final_norms.{m}.\2"),
    ]
]

# Official keys with no counterpart in an inference model: buffers we recompute, and
# pretraining/fine-tuning-only modules. A plugin's ``ignore`` adds its adapter's own.
_IGNORED = re.compile(
    r"(^|\.)(rp_bucket|position_idx|version)$|(^|\.)decoder|mask_token|mask_head|^classify_head\."
)
_ADAPTER_KEY = re.compile(rf"(?:encoder_wrapper\.)?{_OFFICIAL}_adapter\.(.+)$")
_PROJECTION_KEY = re.compile(rf"{_OFFICIAL}_proj\.(weight|bias)$")
_FUSION_PREFIX = r"(?:encoder_wrapper\.fusion_model\.|encoder\.)"
#: Keys that belong to one official modality; group 1 names it.
_OWNED_KEYS = (
    _ADAPTER_KEY,
    _PROJECTION_KEY,
    re.compile(rf"{_FUSION_PREFIX}layers\.\d+\.{_OFFICIAL}_ffn\."),
    re.compile(rf"{_FUSION_PREFIX}{_OFFICIAL}_layer_norm\."),
)
_TABLE_KEY = re.compile(
    rf"(?:encoder_wrapper\.)?{_OFFICIAL}_adapter\.rel_pos_table_list\.(\d+)\.weight$"
)

#: Official modality name -> (native modality, its plugin's mapping).
Claims = dict[str, tuple[str, ForeignAdapter]]


def _claims(registry: Registry) -> Claims:
    claims: Claims = {}
    for native in registry.modalities():
        foreign = registry.modality(native).foreign_adapters.get(FORMAT)
        if foreign is not None:
            claims[foreign.name] = (native, foreign)
    return claims


def _map_fusion(key: str, claims: Claims) -> str | None:
    for pattern, target in _FUSION_RULES:
        match = pattern.match(key)
        if match:
            official = match.groupdict().get("m")
            native = claims[official][0] if official else ""
            return match.expand(target).replace("{m}", native)
    return None


def _official_names(keys: list[str]) -> set[str]:
    """The official modalities a checkpoint holds (the names of its adapters)."""
    return {match.group(1) for key in keys if (match := _ADAPTER_KEY.match(key))}


def official_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The official model state dict inside ``checkpoint``, or None if it is not official."""
    state = checkpoint.get("model")
    if not isinstance(state, Mapping) or not state:
        return None
    keys = list(state)
    full = any(key.startswith("encoder_wrapper.") for key in keys)
    vision_only = any(key.startswith("encoder.layers.") for key in keys) and any(
        key.startswith("image_adapter.") for key in keys
    )
    return dict(state) if full or vision_only else None


def convert_official(
    checkpoint: Mapping[str, Any], source: str, registry: Registry
) -> ConvertedCheckpoint | None:
    """Convert an official ONE-PEACE checkpoint; None when ``checkpoint`` is not one."""
    official = official_state_dict(checkpoint)
    if official is None:
        return None
    claims = _claims(registry)
    present = _official_names(list(official))
    unclaimed = sorted(present - set(claims))
    if unclaimed:
        warnings.warn(
            f"{source}: official modalities {unclaimed} are left out: no installed plugin maps "
            f"them (ModalitySpec.foreign_adapters[{FORMAT!r}]); plugins mapping one: "
            + (", ".join(f"{n} ({o})" for o, (n, _) in sorted(claims.items())) or "none"),
            PeaceWarning,
            stacklevel=3,
        )
    kept = {name: claims[name] for name in present if name in claims}
    if not kept:
        raise OfficialCheckpointError(
            f"{source}: no modality of the checkpoint ({sorted(present)}) is mapped by an "
            "installed plugin"
        )
    state: dict[str, torch.Tensor] = {}
    adapter_states: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in kept.values()}
    mapped, ignored, unknown = [], [], []
    for key, value in official.items():
        # bf16-trained weights are cast to fp32 here; from_pretrained casts to the asked dtype.
        value = value.float() if value.is_floating_point() else value
        owner = _owner(key)
        if owner is not None and owner not in kept:
            ignored.append(key)  # a modality left out above
            continue
        native = _map_key(key, kept)
        if native is not None:
            state[native] = value
            mapped.append(key)
            if native.startswith("adapters."):
                modality, rest = native[len("adapters.") :].split(".", 1)
                adapter_states[modality][rest] = value
        elif _IGNORED.search(key) or _ignored_by_plugin(key, kept):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(
            f"{source}: {len(unknown)} official key(s) have no native counterpart: "
            + ", ".join(sorted(unknown)[:20])
        )
    cfg = checkpoint.get("cfg") if isinstance(checkpoint.get("cfg"), Mapping) else {}
    config = _native_config(official, state, adapter_states, kept, cfg, source)
    return ConvertedCheckpoint(
        config=config, state_dict=state, mapped=mapped, ignored=ignored, source_format=FORMAT
    )


def _owner(key: str) -> str | None:
    """The official modality a per-modality key belongs to (None for shared layers)."""
    for pattern in _OWNED_KEYS:
        match = pattern.match(key)
        if match:
            return match.group(1)
    return None


def _map_key(key: str, claims: Claims) -> str | None:
    """Native key for an official key, or None when it has no counterpart."""
    for prefix in ("encoder_wrapper.fusion_model.", "encoder."):
        if key.startswith(prefix):
            mapped = _map_fusion(key[len(prefix) :], claims)
            return None if mapped is None else "encoder." + mapped
    match = _ADAPTER_KEY.match(key)
    if match:
        official, rest = match.groups()
        native, foreign = claims[official]
        mapped = foreign.map_key(rest)
        return None if mapped is None else f"adapters.{native}.{mapped}"
    match = _PROJECTION_KEY.match(key)
    if match:
        return f"projections.{claims[match.group(1)][0]}.{match.group(2)}"
    if key == "logit_scale":
        return key
    return None


def _ignored_by_plugin(key: str, claims: Claims) -> bool:
    match = _ADAPTER_KEY.match(key)
    if not match:
        return False
    foreign = claims[match.group(1)][1]
    return bool(foreign.ignore) and re.search(foreign.ignore, match.group(2)) is not None


# ------------------------------------------------------------------------------ configuration


def _encoder_cfg(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    model = cfg.get("model") or {}
    return model.get("encoder") or {}


def _count(keys: Iterable[str], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({match.group(1) for key in keys if (match := compiled.match(key))})


def _native_config(
    official: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    adapter_states: Mapping[str, Mapping[str, torch.Tensor]],
    claims: Claims,
    cfg: Mapping[str, Any],
    source: str,
) -> dict[str, Any]:
    enc_cfg = _encoder_cfg(cfg)
    # Heads and the table layout are read from the official relative-position tables
    # ([rows, heads], one per layer or one shared), which every official adapter holds.
    tables = {}
    for key, value in official.items():
        match = _TABLE_KEY.match(key)
        if match and match.group(1) in claims:
            tables.setdefault(match.group(1), {})[int(match.group(2))] = value
    if not tables:
        raise OfficialCheckpointError(f"{source}: no relative-position table found")
    first = sorted(tables)[0]
    heads = tables[first][0].shape[1]
    native_first = claims[first][0]
    encoder = {
        "dim": state["encoder.blocks.0.attn.q_proj.weight"].shape[0],
        "depth": _count(state, r"encoder\.blocks\.(\d+)\."),
        "heads": heads,
        "ffn_dim": state[f"encoder.blocks.0.ffns.{native_first}.wi_0.weight"].shape[0],
        "layer_scale_init": (
            float(enc_cfg.get("layer_scale_init_value", 1e-6))
            if "encoder.blocks.0.attn_scale.gamma" in state
            else None
        ),
        "drop_path": float(enc_cfg.get("drop_path_rate", 0.0)),
        "rel_pos_tables": "shared" if len(tables[first]) == 1 else "per_layer",
        # Fresh parts of a converted model (e.g. a modality added later) follow the official init.
        "init": "official",
    }
    options = {}
    for native, foreign in sorted(claims.values(), key=lambda item: item[0]):
        try:
            options[native] = dict(foreign.infer_options(adapter_states[native], cfg))
        except (ValueError, KeyError) as err:
            raise OfficialCheckpointError(
                f"{source}: cannot infer the options of {native!r} from the checkpoint: {err}"
            ) from err
    return {"name": "one-peace", "encoder": encoder, "modalities": options}
