"""peace-vision: the ``vision`` modality (images) for peace, ONE-PEACE's V-Adapter.

Importing this package is cheap; the torch/Pillow-backed classes load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peace_registry.lazy import lazy_exports
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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
