"""Frame arithmetic of the convolutional feature extractor (torch-free, works on ints and tensors).

Every conv layer is a "valid" convolution without padding, so a clip of ``L`` samples gives
``floor((L - kernel) / stride) + 1`` outputs per layer (spec §1.2, ``_get_mask_indices_dims``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

#: One conv layer of the feature extractor: (out_channels, kernel, stride).
ConvLayer = tuple[int, int, int]

#: The official ONE-PEACE (wav2vec 2.0) feature extractor: total stride 320 samples (20 ms).
OFFICIAL_FEATURE_LAYERS: tuple[ConvLayer, ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)

Count = TypeVar("Count")


def frame_count(samples: Count, layers: Sequence[ConvLayer]) -> Count:
    """Frames the feature extractor makes from ``samples`` (an int or a long tensor).

    Clips shorter than the receptive field give 0 frames (never a negative count).
    """
    count = samples
    for _, kernel, stride in layers:
        count = (count - kernel) // stride + 1
        count = count.clamp(min=0) if hasattr(count, "clamp") else max(count, 0)
    return count


def min_samples_for_frames(frames: int, layers: Sequence[ConvLayer]) -> int:
    """The fewest samples that give at least ``frames`` frames (inverse of :func:`frame_count`)."""
    if frames < 1:
        return 0
    samples = frames
    for _, kernel, stride in reversed(layers):
        samples = (samples - 1) * stride + kernel
    return samples


def receptive_field(layers: Sequence[ConvLayer]) -> int:
    """Samples behind one frame: the shortest clip that gives any output."""
    return min_samples_for_frames(1, layers)


def max_samples_for_frames(frames: int, layers: Sequence[ConvLayer]) -> int:
    """The most samples that give at most ``frames`` frames."""
    return min_samples_for_frames(frames + 1, layers) - 1
