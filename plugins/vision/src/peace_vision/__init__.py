"""peace-vision: the ``vision`` modality (images) for peace, ONE-PEACE's V-Adapter.

Importing this package is cheap; the torch/Pillow-backed classes load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peace_vision.options import CLIP_MEAN, CLIP_STD, PATCH_SIZE, VisionOptions

if TYPE_CHECKING:
    from peace_vision.adapter import HMLPStem, VisionAdapter
    from peace_vision.masking import VisionMasker
    from peace_vision.preprocess import ImageInputError, VisionPreprocessor, decode_image, to_rgb

_LAZY = {
    "HMLPStem": "peace_vision.adapter",
    "VisionAdapter": "peace_vision.adapter",
    "VisionMasker": "peace_vision.masking",
    "ImageInputError": "peace_vision.preprocess",
    "VisionPreprocessor": "peace_vision.preprocess",
    "decode_image": "peace_vision.preprocess",
    "to_rgb": "peace_vision.preprocess",
}

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PATCH_SIZE",
    "HMLPStem",
    "ImageInputError",
    "VisionAdapter",
    "VisionMasker",
    "VisionOptions",
    "VisionPreprocessor",
    "decode_image",
    "to_rgb",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peace_vision' has no attribute {name!r}")
