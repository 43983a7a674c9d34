"""How the vision adapter appears in an official ONE-PEACE checkpoint (the official "image").

Pure string and shape work: no torch import, so the entry module stays cheap to import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from peace_vision.options import PATCH_SIZE

# Official keys relative to "image_adapter." -> ours relative to the adapter.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern + "$"), target)
    for pattern, target in [
        (r"embed_images\.0\.(weight|bias)", r"stem.conv1.\1"),
        (r"embed_images\.1\.layer_norm\.(weight|bias)", r"stem.norm1.\1"),
        (r"embed_images\.3\.(weight|bias)", r"stem.conv2.\1"),
        (r"embed_images\.4\.layer_norm\.(weight|bias)", r"stem.norm2.\1"),
        (r"embed_images\.6\.(weight|bias)", r"stem.conv3.\1"),
        (r"cls_embedding", "cls_token"),
        (r"pos_embed", "pos_embed"),
        (r"rel_pos_table_list\.(\d+)\.weight", r"rel_pos_tables.\1.weight"),
    ]
]


def map_key(key: str) -> str | None:
    for pattern, target in _RULES:
        match = pattern.match(key)
        if match:
            return match.expand(target)
    return None


def infer_options(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Grid sizes from the position tables; the image size from the run's config when saved."""
    pos_side = math.isqrt(state["pos_embed"].shape[0] - 1)
    # (2R-1)^2 + 3 relative-position rows.
    rel_side = (math.isqrt(state["rel_pos_tables.0.weight"].shape[0] - 3) + 1) // 2
    task = cfg.get("task") or {}
    return {
        "image_size": int(task.get("patch_image_size") or PATCH_SIZE * rel_side),
        "pos_bucket_size": pos_side,
        "rel_bucket_size": rel_side,
    }
