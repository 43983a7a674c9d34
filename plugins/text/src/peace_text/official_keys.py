"""How the text adapter appears in an official ONE-PEACE checkpoint.

Pure string and shape work: no torch import, so the entry module stays cheap to import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Official keys relative to "text_adapter." -> ours relative to the adapter.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern + "$"), target)
    for pattern, target in [
        (r"embed_tokens\.weight", "token_embed.weight"),
        (r"cls_embedding", "cls_token"),
        (r"embed_positions\.weight", "pos_embed.weight"),
        (r"rel_pos_table_list\.(\d+)\.weight", r"rel_pos_tables.\1.weight"),
    ]
]

#: The official model reads at most this many tokens when its config does not say.
OFFICIAL_MAX_TOKENS = 70


def map_key(key: str) -> str | None:
    for pattern, target in _RULES:
        match = pattern.match(key)
        if match:
            return match.expand(target)
    return None


def infer_options(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Vocabulary and position sizes from the tables; the token limit from the run's config."""
    task = cfg.get("task") or {}
    return {
        "vocab_size": state["token_embed.weight"].shape[0],
        "max_positions": state["pos_embed.weight"].shape[0],
        # 2 * bucket_size + 2 relative-position rows.
        "bucket_size": (state["rel_pos_tables.0.weight"].shape[0] - 2) // 2,
        "max_tokens": int(task.get("max_src_length", OFFICIAL_MAX_TOKENS)),
    }
