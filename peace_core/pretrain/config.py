"""``PretrainConfig``: everything ``peace pretrain`` needs, as one validated document.

Sections: ``model`` (what to build or load), ``objective`` (loss weights, decoder sizes),
``data`` (webdataset shards), ``optim``, ``schedule``, ``freeze``, plus run settings. Every model
rejects unknown fields, so a typo is an error listing the valid names (see
:mod:`peace_core.config_io` for reading files and ``--set`` overrides). The resolved config is
saved into every checkpoint and as ``config.yaml`` in the output directory.

Relative paths (shards, ``init_from``, ``output_dir``) are relative to the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from peace_core.config import ModelConfig, StrictModel, VariantKind
from peace_core.data.config import DataConfig
from peace_core.pretrain.freeze import FreezeConfig
from peace_core.pretrain.objective import ObjectiveConfig
from peace_core.pretrain.optim import OptimConfig, ScheduleConfig
from peace_core.pretrain.strategy import DistributedConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ModelSection(StrictModel):
    """What to train: a preset or a full model config, optionally initialised from a checkpoint.

    Without ``init_from`` the model is built from ``preset`` (a name from ``peace models``) or
    ``config`` (a :class:`~peace_core.config.ModelConfig`), with ``overrides`` (encoder or
    top-level fields, e.g. ``{depth = 4}``) and only ``modalities`` when given.

    With ``init_from`` (a checkpoint file, or a run directory: its latest checkpoint) the
    checkpoint's config and weights are the base: ``modalities`` picks which to keep and which to
    add, new modalities take their options from ``preset``/``config`` when given (plugin
    defaults otherwise) and start freshly initialised. ``preset``/``config`` must then agree
    with the checkpoint's encoder sizes.

    ``options`` changes single modality options last (``{audio = {max_duration = 5.0}}``).
    ``variants`` picks named component variants (``{vision = {masker = "block"}}``), over those
    of the preset, config or checkpoint.
    """

    preset: str | None = Field(None, description="architecture preset name (peace models)")
    config: ModelConfig | None = Field(None, description="a full model config instead of a preset")
    modalities: list[str] | None = Field(
        None, min_length=1, description="modalities to build (default: all the config names)"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="encoder or top-level model fields to change"
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-modality option changes merged into the preset's/checkpoint's, e.g. "
        "{text = {max_tokens = 64}}",
    )
    variants: dict[str, dict[VariantKind, str]] = Field(
        default_factory=dict,
        description="named component variants per modality, e.g. {vision = {masker = 'block'}}",
    )
    init_from: str | None = Field(
        None, description="checkpoint whose weights start the run (e.g. the stage-1 model)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.preset is not None and self.config is not None:
            raise ValueError("give model.preset or model.config, not both")
        if self.preset is None and self.config is None and self.init_from is None:
            raise ValueError("give model.preset, model.config or model.init_from")
        return self

    @field_validator("modalities")
    @classmethod
    def _unique(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"modalities are listed twice: {names}")
        return names

    def architecture(self) -> str | ModelConfig | None:
        return self.preset if self.preset is not None else self.config


class PretrainConfig(StrictModel):
    """A whole pretraining run (DESIGN §5, spec §3.5–3.7)."""

    model: ModelSection
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    clip_norm: float | None = Field(3.0, gt=0.0, description="max gradient norm; None: no clip")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_skipped_steps: int = Field(
        5,
        ge=1,
        description="a step with a non-finite loss or gradient is skipped (no update) and "
        "reported with its samples; this many in a row stop the run",
    )
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast on CUDA when supported, else fp32"
    )
    grad_checkpointing: bool = Field(False, description="recompute encoder blocks in backward")
    output_dir: str = Field("runs/pretrain", min_length=1)
    log_every: int = Field(10, ge=1, description="optimizer steps between metric records")
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=0, description="newest step checkpoints kept; 0: all")
    auto_resume: bool = Field(True, description="continue from output_dir's latest checkpoint")
    tensorboard: bool = Field(True, description="also write TensorBoard event files")
    seed: int = Field(3407, ge=0)
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda:1'...")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per process; None: this rank's share of the CPUs "
        "less its data workers (peace_core.threads)",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="how ranks share the work under torchrun: ddp replicas or fsdp shards",
    )
    find_unused_parameters: bool | None = Field(
        None,
        description="DDP: allow parameters without a gradient in a step (batches of different "
        "modality sets, views weighted 0). None decides: on unless every dataset holds every "
        "model modality and every loss term is weighted",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device == "auto":
            return device
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from err
        return device

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.distributed.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError(
                "distributed.strategy 'fsdp' does not support precision 'fp16'; use bf16 or fp32"
            )
        if self.distributed.cpu_offload and self.distributed.strategy != "fsdp":
            raise ValueError("distributed.cpu_offload needs distributed.strategy 'fsdp'")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(
                f"schedule.min_lr ({self.schedule.min_lr}) is above optim.lr ({self.optim.lr})"
            )
        modalities = self.model.modalities
        if modalities is not None:
            missing = [m for m in self.data.modalities if m not in modalities]
            if missing:
                raise ValueError(
                    f"data needs modalities {missing} that model.modalities {modalities} lacks"
                )
        if self.freeze.train_only is not None and modalities is not None:
            unknown = [m for m in self.freeze.train_only if m not in modalities]
            if unknown:
                raise ValueError(
                    f"freeze.train_only names {unknown}, not in model.modalities {modalities}"
                )
        return self


def load_pretrain_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> PretrainConfig:
    """Read a TOML/YAML pretraining config with ``--set`` style overrides."""
    from peace_core.config_io import load_config

    return load_config(PretrainConfig, path, overrides)
