"""Relative-position bucket indices (spec §2.3), shared by modality plugins.

Position 0 of every modality sequence is its CLS token, which gets three buckets of its own:
CLS as query, CLS as key, and CLS to itself. Indices address rows of an
``nn.Embedding(rows, heads)`` table owned by the adapter.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

#: Largest sequence (CLS included) the 1-D buckets are defined for, as in the official model.
MAX_TOKEN_POSITIONS = 1024


def token_bucket_rows(bucket_size: int) -> int:
    """Rows of a 1-D table: ``2*bucket_size - 1`` distance buckets plus 3 CLS buckets."""
    return 2 * bucket_size + 2


def grid_bucket_rows(rel_bucket_size: int) -> int:
    """Rows of a 2-D table: ``(2R-1)^2`` offset buckets plus 3 CLS buckets."""
    return (2 * rel_bucket_size - 1) ** 2 + 3


def _with_cls_buckets(index: torch.Tensor, rows: int) -> torch.Tensor:
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


@lru_cache(maxsize=32)
def _token_bucket_index(length: int, bucket_size: int, max_position: int) -> torch.Tensor:
    positions = torch.arange(length)
    distance = positions[:, None] - positions[None, :]
    half = bucket_size // 2
    magnitude = distance.abs()
    # Beyond `half`, distances share log-spaced buckets up to `bucket_size - 1` at max_position-1.
    # float32 on purpose: bucket boundaries must fall exactly where the official model puts them.
    far = magnitude.clamp(min=half).float()
    log_ratio = torch.log(far / half) / math.log((max_position - 1) / half)
    far_bucket = (torch.ceil(log_ratio * (half - 1)) + half).long()
    bucket = torch.where(magnitude <= half, distance, far_bucket * distance.sign())
    index = bucket + bucket_size - 1
    return _with_cls_buckets(index, token_bucket_rows(bucket_size))


def token_bucket_index(
    length: int, bucket_size: int, max_position: int = MAX_TOKEN_POSITIONS
) -> torch.Tensor:
    """``[length, length]`` bucket indices for a 1-D sequence whose position 0 is CLS."""
    if bucket_size < 2:
        raise ValueError(f"bucket_size must be at least 2, got {bucket_size}")
    if not 0 < length <= max_position:
        raise ValueError(
            f"sequence of {length} tokens (CLS included) is outside the relative-position range "
            f"1..{max_position}; shorten the input"
        )
    return _token_bucket_index(length, bucket_size, max_position)


@lru_cache(maxsize=32)
def _grid_bucket_index(height: int, width: int, rel_bucket_size: int) -> torch.Tensor:
    rows = torch.arange(height).repeat_interleave(width)  # row-major patch order
    cols = torch.arange(width).repeat(height)
    span = 2 * rel_bucket_size - 1
    d_row = rows[:, None] - rows[None, :] + rel_bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + rel_bucket_size - 1
    index = torch.zeros(height * width + 1, height * width + 1, dtype=torch.long)
    index[1:, 1:] = d_row * span + d_col
    return _with_cls_buckets(index, grid_bucket_rows(rel_bucket_size))


def grid_bucket_index(height: int, width: int, rel_bucket_size: int) -> torch.Tensor:
    """``[1+H*W, 1+H*W]`` BEiT-style 2-D bucket indices for a patch grid preceded by CLS."""
    if not (0 < height <= rel_bucket_size and 0 < width <= rel_bucket_size):
        raise ValueError(
            f"patch grid {height}x{width} does not fit rel_bucket_size {rel_bucket_size}: "
            "each side must be between 1 and rel_bucket_size"
        )
    return _grid_bucket_index(height, width, rel_bucket_size)


def gather_bucket_index(index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Restrict ``[N,N]`` indices to kept positions ``keep`` ``[B,K]`` (``-1`` = padding).

    Distances stay those of the original positions. Padding slots get index 0; the encoder masks
    them as keys.
    """
    safe = keep.clamp(min=0)
    return index[safe[:, :, None], safe[:, None, :]]
