"""AdamW parameter groups and the warmup + cosine learning-rate schedule (spec §3.7).

Weight decay shrinks weights towards zero; on biases, normalisation gains, LayerScale gammas,
``logit_scale``, CLS/position/mask tokens and position tables it only fights what those
parameters are for, so they get none. The rule: every tensor with fewer than 2 dimensions, plus
every parameter whose dotted name has a component listed in ``no_decay_names``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from peace_core.config import StrictModel

#: Name components of parameters that get no weight decay whatever their shape: learned tokens
#: and position tables (ONE-PEACE/BEiT/timm practice).
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = (
    "cls_token",
    "cls_pos",
    "pos_embed",
    "mask_tokens",
    "positions",
    "rel_pos_tables",
    "logit_scale",
)


class OptimConfig(StrictModel):
    """AdamW settings; the defaults are ONE-PEACE's (spec §3.7) except the learning rate."""

    lr: float = Field(5e-4, gt=0.0, description="peak learning rate (after warmup)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0, description="decoupled weight decay")
    no_decay_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NO_DECAY_NAMES),
        description="name components whose parameters get no weight decay (besides 0-D/1-D)",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must both lie in [0, 1), got {betas}")
        return betas


class ScheduleConfig(StrictModel):
    """Linear warmup, then cosine decay to ``min_lr`` (or a constant rate).

    The length is ``total_steps`` optimizer steps, or ``epochs`` of the data (needs
    ``data.epoch_samples``). Warmup is ``warmup_steps`` or ``warmup_fraction`` of the total
    (neither: no warmup).
    """

    total_steps: int | None = Field(None, gt=0, description="optimizer steps in the schedule")
    epochs: float | None = Field(None, gt=0.0, description="alternative to total_steps")
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    min_lr: float = Field(1e-6, ge=0.0, description="learning rate at the end of the decay")
    kind: Literal["cosine", "constant"] = Field(
        "cosine", description="after warmup: cosine decay to min_lr, or constant at the peak"
    )

    @model_validator(mode="after")
    def _one_length_one_warmup(self) -> ScheduleConfig:
        if (self.total_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of schedule.total_steps and schedule.epochs")
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("set at most one of schedule.warmup_steps and warmup_fraction")
        return self

    def resolve(self, steps_per_epoch: int | None = None) -> ResolvedSchedule:
        """Total and warmup steps as numbers; ``steps_per_epoch`` is needed for ``epochs``."""
        if self.total_steps is not None:
            total = self.total_steps
        else:
            if steps_per_epoch is None:
                raise ValueError(
                    "schedule.epochs needs a known epoch length: set data.epoch_samples, or "
                    "give schedule.total_steps instead"
                )
            total = max(1, math.ceil(float(self.epochs) * steps_per_epoch))
        if self.warmup_steps is not None:
            warmup = self.warmup_steps
        elif self.warmup_fraction is not None:
            warmup = round(self.warmup_fraction * total)
        else:
            warmup = 0
        if warmup >= total and total > 1:
            raise ValueError(f"warmup ({warmup} steps) must be shorter than the schedule ({total})")
        return ResolvedSchedule(
            total_steps=total, warmup_steps=warmup, min_lr=self.min_lr, kind=self.kind
        )


@dataclass(frozen=True)
class ResolvedSchedule:
    total_steps: int
    warmup_steps: int
    min_lr: float
    kind: str


def lr_at(step: int, peak_lr: float, schedule: ResolvedSchedule) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warmup rises linearly so that step 0 already learns (``peak/warmup``) and step
    ``warmup-1`` uses the peak; the cosine then falls from the peak to ``min_lr`` at
    ``total_steps`` and stays there.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup, total = schedule.warmup_steps, schedule.total_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return peak_lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = min(schedule.min_lr, peak_lr)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, peak_lr: float, schedule: ResolvedSchedule
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at` (call ``step()`` after each optimizer step).

    The factor is a plain function, so a resumed run uses the schedule of its current config.
    """

    def factor(step: int) -> float:
        return lr_at(step, peak_lr, schedule) / peak_lr

    return LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Parameter groups


def wants_no_decay(name: str, param: torch.Tensor, no_decay_names: Iterable[str]) -> bool:
    """True for 0-D/1-D tensors and for parameters with a ``no_decay_names`` name component."""
    if param.ndim < 2:
        return True
    components = set(name.split("."))
    return any(entry in components for entry in no_decay_names)


def param_groups(
    module: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES
) -> list[dict[str, Any]]:
    """AdamW groups of ``module``'s trainable parameters: ``decay`` and ``no_decay``.

    Frozen parameters (``requires_grad=False``) are left out entirely, so the optimizer never
    touches them (not even by weight decay). Each group carries ``names`` for inspection.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if wants_no_decay(name, param, no_decay_names) else decay).append((name, param))
    groups = []
    for label, members, decay_value in (
        ("decay", decay, weight_decay),
        ("no_decay", no_decay, 0.0),
    ):
        if members:
            groups.append(
                {
                    "params": [param for _, param in members],
                    "names": [name for name, _ in members],
                    "weight_decay": decay_value,
                    "group": label,
                }
            )
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (requires_grad=False)")
    return groups


def build_optimizer(module: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``module`` with ``config``'s settings."""
    groups = param_groups(module, config.weight_decay, config.no_decay_names)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
