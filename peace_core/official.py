"""Converter for official ONE-PEACE checkpoints (spec §6) into native config + state dict.

Handles the full pretrained/retrieval file (``encoder_wrapper.*`` + projections), fine-tuned files
(one relative-position table per layer, only some modalities, ``classify_head.*`` ignored) and the
vision-only file written by the official ``convert_to_vision.py`` (``encoder.*`` +
``image_adapter.*``). The official modality "image" is our "vision".
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from peace_registry.contract import ConvertedCheckpoint
from peace_registry.errors import PeaceError

OFFICIAL_TO_NATIVE = {"text": "text", "image": "vision", "audio": "audio"}
_OFFICIAL = "(text|image|audio)"

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


class OfficialCheckpointError(PeaceError, ValueError):
    """An official-looking checkpoint this converter cannot map."""


def _rule(pattern: str, target: str | Callable[[re.Match[str]], str]) -> Rule:
    compiled = re.compile(pattern + r"$")
    if isinstance(target, str):
        return compiled, lambda match: match.expand(target)
    return compiled, target


def _native(match: re.Match[str], group: int = 1) -> str:
    return OFFICIAL_TO_NATIVE[match.group(group)]


# Keys relative to the fusion model ("encoder_wrapper.fusion_model." or "encoder.").
_FUSION_RULES: list[Rule] = [
    _rule(r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    _rule(
        r"layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"
    ),
    _rule(r"layers\.(\d+)\.self_attn\.ln\.(weight|bias)", r"blocks.\1.attn.inner_norm.\2"),
    _rule(r"layers\.(\d+)\.gamma_1", r"blocks.\1.attn_scale.gamma"),
    _rule(r"layers\.(\d+)\.gamma_2", r"blocks.\1.ffn_scale.gamma"),
    _rule(r"layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"blocks.\1.ffn_norm.\2"),
    _rule(
        rf"layers\.(\d+)\.{_OFFICIAL}_ffn\.0\.(wi_0|wi_1)\.weight",
        lambda m: f"blocks.{m.group(1)}.ffns.{_native(m, 2)}.{m.group(3)}.weight",
    ),
    _rule(
        rf"layers\.(\d+)\.{_OFFICIAL}_ffn\.2\.(weight|bias)",
        lambda m: f"blocks.{m.group(1)}.ffns.{_native(m, 2)}.norm.{m.group(3)}",
    ),
    _rule(
        rf"layers\.(\d+)\.{_OFFICIAL}_ffn\.3\.(weight|bias)",
        lambda m: f"blocks.{m.group(1)}.ffns.{_native(m, 2)}.wo.{m.group(3)}",
    ),
    _rule(
        rf"{_OFFICIAL}_layer_norm\.(weight|bias)",
        lambda m: f"final_norms.{_native(m)}.{m.group(2)}",
    ),
]

_TABLE_RULE = _rule(r"rel_pos_table_list\.(\d+)\.weight", r"rel_pos_tables.\1.weight")

# Keys relative to "<official modality>_adapter.".
_ADAPTER_RULES: dict[str, list[Rule]] = {
    "image": [
        _rule(r"embed_images\.0\.(weight|bias)", r"stem.conv1.\1"),
        _rule(r"embed_images\.1\.layer_norm\.(weight|bias)", r"stem.norm1.\1"),
        _rule(r"embed_images\.3\.(weight|bias)", r"stem.conv2.\1"),
        _rule(r"embed_images\.4\.layer_norm\.(weight|bias)", r"stem.norm2.\1"),
        _rule(r"embed_images\.6\.(weight|bias)", r"stem.conv3.\1"),
        _rule(r"cls_embedding", "cls_token"),
        _rule(r"pos_embed", "pos_embed"),
        _TABLE_RULE,
    ],
    "audio": [
        _rule(
            r"embed_audios\.0\.conv_layers\.(\d+)\.0\.weight",
            r"feature_extractor.layers.\1.conv.weight",
        ),
        _rule(
            r"embed_audios\.0\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
            r"feature_extractor.layers.\1.norm.\2",
        ),
        _rule(r"embed_audios\.2\.(weight|bias)", r"feature_norm.\1"),
        _rule(r"embed_audios\.3\.(weight|bias)", r"feature_proj.\1"),
        _rule(
            r"embed_positions\.(\d+)\.0\.(weight|bias)",
            lambda m: f"conv_pos.layers.{int(m.group(1)) - 1}.conv.{m.group(2)}",
        ),
        _rule(r"cls_embedding", "cls_token"),
        _rule(r"cls_pos_embed", "cls_pos"),
        _TABLE_RULE,
    ],
    "text": [
        _rule(r"embed_tokens\.weight", "token_embed.weight"),
        _rule(r"cls_embedding", "cls_token"),
        _rule(r"embed_positions\.weight", "pos_embed.weight"),
        _TABLE_RULE,
    ],
}

# Official keys with no counterpart in an inference model: buffers we recompute, the unused audio
# mask embedding, and pretraining/fine-tuning-only modules.
_IGNORED = re.compile(
    r"(^|\.)(rp_bucket|position_idx|version|mask_embedding)$"
    r"|(^|\.)decoder|mask_token|mask_head|^classify_head\."
)


def _apply(rules: list[Rule], key: str) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target(match)
    return None


def _map_key(key: str) -> str | None:
    """Native key for an official key, or None when it has no counterpart."""
    for prefix in ("encoder_wrapper.fusion_model.", "encoder."):
        if key.startswith(prefix):
            mapped = _apply(_FUSION_RULES, key[len(prefix) :])
            return None if mapped is None else "encoder." + mapped
    match = re.match(rf"(?:encoder_wrapper\.)?{_OFFICIAL}_adapter\.(.+)$", key)
    if match:
        official, rest = match.groups()
        mapped = _apply(_ADAPTER_RULES[official], rest)
        return None if mapped is None else f"adapters.{OFFICIAL_TO_NATIVE[official]}.{mapped}"
    match = re.match(rf"{_OFFICIAL}_proj\.(weight|bias)$", key)
    if match:
        return f"projections.{_native(match)}.{match.group(2)}"
    if key == "logit_scale":
        return key
    return None


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


def convert_official(checkpoint: Mapping[str, Any], source: str) -> ConvertedCheckpoint | None:
    """Convert an official ONE-PEACE checkpoint; None when ``checkpoint`` is not one."""
    official = official_state_dict(checkpoint)
    if official is None:
        return None
    state: dict[str, torch.Tensor] = {}
    mapped, ignored, unknown = [], [], []
    for key, value in official.items():
        native = _map_key(key)
        if native is not None:
            # bf16-trained weights are cast to fp32 here; from_pretrained casts to the asked dtype.
            state[native] = value.float() if value.is_floating_point() else value
            mapped.append(key)
        elif _IGNORED.search(key):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(
            f"{source}: {len(unknown)} official key(s) have no native counterpart: "
            + ", ".join(sorted(unknown)[:20])
        )
    cfg = checkpoint.get("cfg") if isinstance(checkpoint.get("cfg"), Mapping) else {}
    config = _native_config(state, cfg, source)
    return ConvertedCheckpoint(
        config=config, state_dict=state, mapped=mapped, ignored=ignored, source_format="one-peace"
    )


# ------------------------------------------------------------------------------ configuration


def _encoder_cfg(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    model = cfg.get("model") or {}
    return model.get("encoder") or {}


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({compiled.match(key).group(1) for key in state if compiled.match(key)})


def _native_config(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], source: str
) -> dict[str, Any]:
    enc_cfg = _encoder_cfg(cfg)
    modalities = sorted({key.split(".")[1] for key in state if key.startswith("adapters.")})
    if not modalities:
        raise OfficialCheckpointError(f"{source}: no modality adapter found in the checkpoint")
    depth = _count(state, r"encoder\.blocks\.(\d+)\.")
    q_weight = state["encoder.blocks.0.attn.q_proj.weight"]
    first = modalities[0]
    ffn_dim = state[f"encoder.blocks.0.ffns.{first}.wi_0.weight"].shape[0]
    heads = state[f"adapters.{first}.rel_pos_tables.0.weight"].shape[1]
    tables = _count(state, rf"adapters\.{first}\.rel_pos_tables\.(\d+)\.")
    encoder = {
        "dim": q_weight.shape[0],
        "depth": depth,
        "heads": heads,
        "ffn_dim": ffn_dim,
        "layer_scale_init": (
            float(enc_cfg.get("layer_scale_init_value", 1e-6))
            if "encoder.blocks.0.attn_scale.gamma" in state
            else None
        ),
        "drop_path": float(enc_cfg.get("drop_path_rate", 0.0)),
        "rel_pos_tables": "shared" if tables == 1 else "per_layer",
        # Fresh parts of a converted model (e.g. a modality added later) follow the official init.
        "init": "official",
    }
    builders = {"vision": _vision_options, "audio": _audio_options, "text": _text_options}
    options = {name: builders[name](state, enc_cfg, cfg) for name in modalities}
    return {"name": "one-peace", "encoder": encoder, "modalities": options}


def _rows(state: Mapping[str, torch.Tensor], modality: str) -> int:
    return state[f"adapters.{modality}.rel_pos_tables.0.weight"].shape[0]


def _vision_options(state, enc_cfg, cfg) -> dict[str, Any]:
    pos_rows = state["adapters.vision.pos_embed"].shape[0]
    pos_side = math.isqrt(pos_rows - 1)
    rel_side = (math.isqrt(_rows(state, "vision") - 3) + 1) // 2
    task = cfg.get("task") or {}
    image_size = int(task.get("patch_image_size") or 16 * rel_side)
    return {
        "image_size": image_size,
        "pos_bucket_size": pos_side,
        "rel_bucket_size": rel_side,
    }


def _audio_options(state, enc_cfg, cfg) -> dict[str, Any]:
    audio_cfg = enc_cfg.get("audio_adapter") or {}
    spec = audio_cfg.get("feature_encoder_spec")
    layers = _parse_feature_spec(spec) if spec else None
    n_layers = _count(state, r"adapters\.audio\.feature_extractor\.layers\.(\d+)\.")
    if layers is None:
        raise OfficialCheckpointError(
            "the checkpoint's cfg has no audio_adapter.feature_encoder_spec: the conv strides "
            "cannot be recovered from the weights alone"
        )
    if len(layers) != n_layers:
        raise OfficialCheckpointError(
            f"feature_encoder_spec lists {len(layers)} conv layers, the weights hold {n_layers}"
        )
    pos_weight = state["adapters.audio.conv_pos.layers.0.conv.weight"]
    depth = _count(state, r"adapters\.audio\.conv_pos\.layers\.(\d+)\.")
    kernel = pos_weight.shape[-1]
    return {
        "feature_layers": [list(layer) for layer in layers],
        "conv_pos_depth": depth,
        "conv_pos_width": kernel * depth,
        "conv_pos_groups": pos_weight.shape[0] // pos_weight.shape[1],
        "bucket_size": (_rows(state, "audio") - 2) // 2,
        "conv_pos_sees_padding": True,  # the official adapter's behaviour, for parity
    }


def _text_options(state, enc_cfg, cfg) -> dict[str, Any]:
    task = cfg.get("task") or {}
    return {
        "vocab_size": state["adapters.text.token_embed.weight"].shape[0],
        "max_positions": state["adapters.text.pos_embed.weight"].shape[0],
        "bucket_size": (_rows(state, "text") - 2) // 2,
        "max_tokens": int(task.get("max_src_length", 70)),
    }


def _parse_feature_spec(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate a spec like ``"[(512,10,5)] + [(512,3,2)] * 4"`` without ``eval``."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise OfficialCheckpointError(f"unsupported element in feature_encoder_spec: {spec!r}")

    try:
        parsed = value(ast.parse(spec, mode="eval"))
    except SyntaxError as err:
        raise OfficialCheckpointError(f"cannot parse feature_encoder_spec {spec!r}") from err
    if not isinstance(parsed, list) or not all(
        isinstance(layer, tuple) and len(layer) == 3 for layer in parsed
    ):
        raise OfficialCheckpointError(
            f"feature_encoder_spec {spec!r} must be a list of (channels, kernel, stride)"
        )
    return parsed
