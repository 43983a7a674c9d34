"""The ``audio`` modality for peace: ONE-PEACE's A-adapter, block masking and preprocessing.

Everything is exposed lazily so that importing the plugin's entry module stays cheap.
"""

from __future__ import annotations

from peace_registry.lazy import lazy_exports

_LAZY = {
    "OFFICIAL_FEATURE_LAYERS": "peace_audio.frames",
    "frame_count": "peace_audio.frames",
    "receptive_field": "peace_audio.frames",
    "AudioOptions": "peace_audio.options",
    "AudioAdapter": "peace_audio.adapter",
    "AudioBatchError": "peace_audio.adapter",
    "AudioBlockMasker": "peace_audio.masking",
    "block_mask_1d": "peace_audio.masking",
    "AudioPreprocessor": "peace_audio.preprocess",
    "AudioInputError": "peace_audio.preprocess",
    "decode_audio_bytes": "peace_audio.preprocess",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
