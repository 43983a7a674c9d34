"""How the audio adapter appears in an official ONE-PEACE checkpoint.

Pure string and shape work: no torch import, so the entry module stays cheap to import. The conv
strides of the feature extractor are not in the weights: they come from the run's config
(``model.encoder.audio_adapter.feature_encoder_spec``), which official checkpoints carry.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

# Official keys relative to "audio_adapter." -> ours relative to the adapter.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern + "$"), target)
    for pattern, target in [
        (
            r"embed_audios\.0\.conv_layers\.(\d+)\.0\.weight",
            r"feature_extractor.layers.\1.conv.weight",
        ),
        (
            r"embed_audios\.0\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
            r"feature_extractor.layers.\1.norm.\2",
        ),
        (r"embed_audios\.2\.(weight|bias)", r"feature_norm.\1"),
        (r"embed_audios\.3\.(weight|bias)", r"feature_proj.\1"),
        (r"cls_embedding", "cls_token"),
        (r"cls_pos_embed", "cls_pos"),
        (r"rel_pos_table_list\.(\d+)\.weight", r"rel_pos_tables.\1.weight"),
    ]
]
_CONV_POS = re.compile(r"embed_positions\.(\d+)\.0\.(weight|bias)$")

#: The official adapter's mask embedding serves its pretraining only.
IGNORED = r"^mask_embedding$"


def map_key(key: str) -> str | None:
    match = _CONV_POS.match(key)
    if match:  # the official Sequential starts with a non-conv module: its convs are 1..depth
        return f"conv_pos.layers.{int(match.group(1)) - 1}.conv.{match.group(2)}"
    for pattern, target in _RULES:
        match = pattern.match(key)
        if match:
            return match.expand(target)
    return None


def _count(state: Mapping[str, Any], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({match.group(1) for key in state if (match := compiled.match(key))})


def infer_options(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    model = cfg.get("model") or {}
    adapter_cfg = (model.get("encoder") or {}).get("audio_adapter") or {}
    spec = adapter_cfg.get("feature_encoder_spec")
    if not spec:
        raise ValueError(
            "the checkpoint's cfg has no audio_adapter.feature_encoder_spec: the conv strides "
            "cannot be recovered from the weights alone"
        )
    layers = parse_feature_spec(spec)
    n_layers = _count(state, r"feature_extractor\.layers\.(\d+)\.")
    if len(layers) != n_layers:
        raise ValueError(
            f"feature_encoder_spec lists {len(layers)} conv layers, the weights hold {n_layers}"
        )
    pos_weight = state["conv_pos.layers.0.conv.weight"]
    depth = _count(state, r"conv_pos\.layers\.(\d+)\.")
    return {
        "feature_layers": [list(layer) for layer in layers],
        "conv_pos_depth": depth,
        "conv_pos_width": pos_weight.shape[-1] * depth,
        "conv_pos_groups": pos_weight.shape[0] // pos_weight.shape[1],
        # 2 * bucket_size + 2 relative-position rows.
        "bucket_size": (state["rel_pos_tables.0.weight"].shape[0] - 2) // 2,
        "conv_pos_sees_padding": True,  # the official adapter's behaviour, for parity
    }


def parse_feature_spec(spec: str) -> list[tuple[int, int, int]]:
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
        raise ValueError(f"unsupported element in feature_encoder_spec: {spec!r}")

    try:
        parsed = value(ast.parse(spec, mode="eval"))
    except SyntaxError as err:
        raise ValueError(f"cannot parse feature_encoder_spec {spec!r}") from err
    if not isinstance(parsed, list) or not all(
        isinstance(layer, tuple) and len(layer) == 3 for layer in parsed
    ):
        raise ValueError(
            f"feature_encoder_spec {spec!r} must be a list of (channels, kernel, stride)"
        )
    return parsed
