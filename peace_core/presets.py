"""Architecture presets as plain data.

``PRESETS[name]`` is ``{"description": str, "config": dict}``; ``config`` is valid for
:class:`peace_core.config.ModelConfig` and holds a name and encoder sizes only. A model built from
a preset's name has every installed modality unless it names some (``create_model("tiny",
["vision", "text"])``), and each plugin sizes its own modality for the preset
(``ModalitySpec.preset_options``, e.g. the tiny preset's 64-px images).
LayerScale follows CaiT's rule of thumb (0.1 up to ~18 layers, smaller for deeper stacks), so the
small presets learn quickly from scratch; ``one-peace-4b`` uses the official 1e-6. ``tiny`` has two
layers and needs none (1.0): with 0.1 its CLS embeddings start nearly identical, which slows the
aligning contrast's start. ``tiny`` is 128 wide: 64 wide learns far more slowly, at about the same
CPU cost per step.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any


def _preset(
    name: str,
    *,
    dim: int,
    depth: int,
    heads: int,
    ffn_dim: int,
    layer_scale_init: float,
    drop_path: float,
    init: str = "scratch",
    grad_checkpointing: bool = False,
) -> dict[str, Any]:
    return {
        "name": name,
        "encoder": {
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "ffn_dim": ffn_dim,
            "layer_scale_init": layer_scale_init,
            "drop_path": drop_path,
            "rel_pos_tables": "shared",
            "init": init,
            "grad_checkpointing": grad_checkpointing,
        },
    }


_DESCRIPTIONS: dict[str, str] = {
    "tiny": "128-d, 2 layers, 4 heads: CPU tests, the demo and CPU recipes (under a second a step)",
    "small": "384-d, 12 layers, 6 heads: a small model for a single GPU",
    "base": "768-d, 12 layers, 12 heads: ViT-B-sized fusion encoder",
    "large": "1024-d, 24 layers, 16 heads: ViT-L-sized fusion encoder",
    "one-peace-4b": (
        "the official ONE-PEACE: 1536-d, 40 layers, 24 heads, FFN 6144 (≈3.9 B parameters with "
        "its three modalities)"
    ),
}

_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": _preset(
        "tiny",
        dim=128,
        depth=2,
        heads=4,
        ffn_dim=256,
        layer_scale_init=1.0,
        drop_path=0.0,
    ),
    "small": _preset(
        "small", dim=384, depth=12, heads=6, ffn_dim=1536, layer_scale_init=0.1, drop_path=0.1
    ),
    "base": _preset(
        "base", dim=768, depth=12, heads=12, ffn_dim=3072, layer_scale_init=0.1, drop_path=0.1
    ),
    "large": _preset(
        "large",
        dim=1024,
        depth=24,
        heads=16,
        ffn_dim=4096,
        layer_scale_init=1e-5,
        drop_path=0.2,
        grad_checkpointing=True,  # training activations, not weights, limit the batch from here
    ),
    "one-peace-4b": _preset(
        "one-peace-4b",
        dim=1536,
        depth=40,
        heads=24,
        ffn_dim=6144,
        layer_scale_init=1e-6,
        drop_path=0.4,
        init="official",
        grad_checkpointing=True,
    ),
}

#: name -> {"description": one line, "config": a ModelConfig-shaped dict}.
PRESETS: dict[str, dict[str, Any]] = {
    name: {"description": _DESCRIPTIONS[name], "config": config}
    for name, config in _CONFIGS.items()
}


def _check_name(name: str) -> None:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown preset {name!r}: available presets are {sorted(PRESETS)}{hint}")


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``'s ModelConfig dict (safe to modify)."""
    _check_name(name)
    return copy.deepcopy(PRESETS[name]["config"])


def describe(name: str) -> str:
    """One line saying what preset ``name`` is for."""
    _check_name(name)
    return PRESETS[name]["description"]
