"""Pretraining pieces: the light decoder and the ONE-PEACE objective (spec §3)."""

from peace_core.pretrain.decoder import DecoderConfig, DecoderView, PretrainDecoder
from peace_core.pretrain.objective import (
    LossWeights,
    ObjectiveConfig,
    ObjectiveInputError,
    PretrainObjective,
    kept_positions,
)

__all__ = [
    "DecoderConfig",
    "DecoderView",
    "LossWeights",
    "ObjectiveConfig",
    "ObjectiveInputError",
    "PretrainDecoder",
    "PretrainObjective",
    "kept_positions",
]
