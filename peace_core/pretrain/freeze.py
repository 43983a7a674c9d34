"""Freezing for "stage 2", generalised: teach a model modality X with everything else fixed.

ONE-PEACE's stage 2 (spec §3.6) trains audio against a frozen vision-language model: the audio
adapter, every layer's audio FFN, the audio final norm and projection, ``logit_scale`` and the
whole pretraining decoder learn; the shared attention, the text parts and their projection stay
exactly as stage 1 left them. ``train_only: [X, ...]`` does the same for any modalities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from peace_core.config import StrictModel
from peace_core.pretrain.objective import PretrainObjective


class FreezeConfig(StrictModel):
    """Which parameters learn. The default (``train_only`` unset) trains everything."""

    train_only: list[str] | None = Field(
        None,
        min_length=1,
        description="train only these modalities' adapters, FFNs, final norms and projections, "
        "plus logit_scale and the whole decoder; freeze everything else",
    )
    reset_logit_scale: bool = Field(
        False, description="set logit_scale back to the model config's logit_scale_init"
    )


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`apply_freeze` left trainable (names are ``objective.named_parameters()``)."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_count: int
    frozen_count: int

    def describe(self) -> str:
        total = self.trainable_count + self.frozen_count
        return (
            f"trainable parameters: {self.trainable_count:,} of {total:,} "
            f"({len(self.trainable)} tensors; {len(self.frozen)} frozen)"
        )


def apply_freeze(objective: PretrainObjective, config: FreezeConfig) -> FreezeReport:
    """Set ``requires_grad`` on ``objective``'s parameters following ``config``."""
    model = objective.model
    if config.reset_logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(model.config.logit_scale_init)
    if config.train_only is None:
        for param in objective.parameters():
            param.requires_grad_(True)
        return _report(objective)
    unknown = [name for name in config.train_only if name not in model.modalities]
    if unknown:
        raise ValueError(
            f"freeze.train_only names {unknown}, which the model does not have; it was built "
            f"with {list(model.modalities)}"
        )
    for param in objective.parameters():
        param.requires_grad_(False)
    learners = [objective.decoder]
    for name in config.train_only:
        learners.append(model.adapters[name])
        learners.extend(block.ffns[name] for block in model.encoder.blocks)
        learners.append(model.encoder.final_norms[name])
        learners.append(model.projections[name])
    for module in learners:
        for param in module.parameters():
            param.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    return _report(objective)


def _report(objective: PretrainObjective) -> FreezeReport:
    trainable, frozen = [], []
    trainable_count = frozen_count = 0
    for name, param in objective.named_parameters():
        if param.requires_grad:
            trainable.append(name)
            trainable_count += param.numel()
        else:
            frozen.append(name)
            frozen_count += param.numel()
    return FreezeReport(tuple(trainable), tuple(frozen), trainable_count, frozen_count)
