"""Pretraining: the light decoder and the ONE-PEACE objective (spec §3), and the trainer that
runs them (``Trainer``, ``pretrain``), whose names load on first use (they bring in the data
pipeline, which the objective alone does not need)."""

from peace_core.pretrain.decoder import DecoderConfig, DecoderView, PretrainDecoder
from peace_core.pretrain.objective import (
    LossWeights,
    ObjectiveConfig,
    ObjectiveInputError,
    PretrainObjective,
    kept_positions,
)
from peace_registry.lazy import lazy_exports

_TRAINER = "peace_core.pretrain.trainer"
_EXPORTS = {
    "Trainer": _TRAINER,
    "TrainResult": _TRAINER,
    "TrainingError": _TRAINER,
    "pretrain": _TRAINER,
}

__all__ = [
    "DecoderConfig",
    "DecoderView",
    "LossWeights",
    "ObjectiveConfig",
    "ObjectiveInputError",
    "PretrainDecoder",
    "PretrainObjective",
    "kept_positions",
    *sorted(_EXPORTS),
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
