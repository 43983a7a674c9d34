"""The pretraining loop: ``Trainer(config).fit()`` (DESIGN §5, spec §3.5–3.7).

One optimizer step = ``grad_accum_steps`` micro-batches through :class:`PretrainObjective`
(autocast on GPU), gradient unscaling and clipping, AdamW, the warmup + cosine schedule, and the
``logit_scale`` clamp. Around it: freezing, metrics (JSONL, TensorBoard, progress bar, a PNG at
the end), bad-sample counts from the data pipeline, atomic checkpoints with a ``latest`` pointer,
exact resume, and DDP when launched by ``torchrun``.

Exact resume. A checkpoint holds the model, decoder, optimizer, scheduler, scaler, step and, for
every rank, its data position, bad-sample counts and RNG states (python, numpy, torch CPU/CUDA,
the masking generator). The data stream draws its randomness (augmentations in the main process,
the DataLoader's base seed) from its OWN set of global RNG states, swapped in around every batch
and reseeded from (data seed, epoch, rank) at each epoch start, so replaying the consumed part of
an epoch on resume repeats the same draws and leaves the training RNG untouched. On CPU, N steps,
stop, resume, N steps equals 2N uninterrupted steps bit for bit.

Distributed. With ``WORLD_SIZE > 1`` (torchrun) the process group is started (gloo on CPU, nccl
on CUDA), the objective is wrapped in ``DistributedDataParallel`` and only rank 0 logs and writes
files; logged metrics are rank 0's. FSDP (sharding parameters and optimizer state for models
that do not fit one device) is future work: the objective would be wrapped per fusion block and
checkpoints gathered with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from peace_core.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from peace_core.config import EncoderConfig, ModelConfig
from peace_core.data.pipeline import WebDataLoader, derive_seed
from peace_core.data.stats import DatasetCounts, DataStats
from peace_core.factory import (
    convert_checkpoint,
    create_model,
    model_from_converted,
    resolve_config,
    save_pretrained,
)
from peace_core.losses import clamp_logit_scale_
from peace_core.model import PeaceModel
from peace_core.pretrain.config import ModelSection, PretrainConfig
from peace_core.pretrain.freeze import FreezeReport, apply_freeze
from peace_core.pretrain.logging import (
    METRICS_FILE,
    PLOT_FILE,
    MetricsLogger,
    plot_metrics,
    read_metrics,
)
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.optim import ResolvedSchedule, build_optimizer, build_scheduler
from peace_registry import Registry, get_registry
from peace_registry.contract import ConvertedCheckpoint
from peace_registry.errors import PeaceError

#: Marks a trainer checkpoint (a native checkpoint plus the state needed to resume).
CHECKPOINT_FORMAT = "peace-pretrain/1"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
#: Encoder fields that must agree between ``model.preset``/``config`` and ``init_from``.
_STRUCTURAL_ENCODER_FIELDS = ("dim", "depth", "heads", "ffn_dim", "rel_pos_tables")


class TrainingError(PeaceError, RuntimeError):
    """Training cannot go on (non-finite loss, no data, an unusable checkpoint...)."""


# --------------------------------------------------------------------------------------------
# Devices, precision, processes


@dataclass
class RunContext:
    """Where this process runs: its device and its place in a distributed run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    started_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def start_run(device_setting: str) -> RunContext:
    """Pick the device and, under torchrun (``WORLD_SIZE > 1``), start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    started = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    if dist.is_available() and dist.is_initialized():
        return RunContext(device, dist.get_rank(), dist.get_world_size(), started)
    return RunContext(device)


@dataclass(frozen=True)
class Precision:
    """Resolved precision: autocast dtype (None: fp32) and whether a GradScaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        return self.autocast_dtype == torch.float16


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, fp32 otherwise."""
    cuda = device.type == "cuda"
    if setting == "auto":
        setting = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if setting == "fp32":
        return Precision("fp32", None)
    if setting == "fp16":
        if not cuda:
            raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
        return Precision("fp16", torch.float16)
    if setting == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use precision 'fp16' or 'fp32'")
        return Precision("bf16", torch.bfloat16)
    raise ValueError(f"unknown precision {setting!r}: expected auto, fp32, bf16 or fp16")


# --------------------------------------------------------------------------------------------
# RNG states


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(*, cuda: bool = True) -> dict[str, Any]:
    """The global RNG states as tensors and plain values (safe for ``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


class IsolatedRng:
    """A separate set of global CPU RNG states (python, numpy, torch) swapped in on demand.

    Code run inside :meth:`active` draws from (and advances) these states; the surrounding
    program's states are put back afterwards, untouched.
    """

    def __init__(self, seed: int = 0) -> None:
        self._states: dict[str, Any] = {}
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        outer = capture_rng(cuda=False)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA streams stay the trainer's
        self._states = capture_rng(cuda=False)
        restore_rng(outer)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = capture_rng(cuda=False)
        restore_rng(self._states)
        try:
            yield
        finally:
            self._states = capture_rng(cuda=False)
            restore_rng(outer)


# --------------------------------------------------------------------------------------------
# Data statistics in checkpoints


def stats_to_plain(stats: DataStats) -> dict[str, Any]:
    """DataStats as plain containers (checkpoints are loaded with ``weights_only``)."""
    return {
        name: {
            "ok": c.ok,
            "bad": dict(c.bad),
            "examples": {k: list(v) for k, v in c.examples.items()},
        }
        for name, c in stats.datasets.items()
    }


def stats_from_plain(plain: Mapping[str, Any]) -> DataStats:
    stats = DataStats()
    for name, counts in plain.items():
        restored = DatasetCounts(ok=int(counts["ok"]))
        restored.bad.update({str(k): int(v) for k, v in counts["bad"].items()})
        restored.examples = {str(k): list(v) for k, v in counts["examples"].items()}
        stats.datasets[name] = restored
    return stats


# --------------------------------------------------------------------------------------------
# Checkpoint files


class CheckpointStore:
    """``step_00001000.pt`` files in one directory, a ``latest`` pointer, and pruning."""

    POINTER = "latest"
    _PATTERN = re.compile(r"^step_(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike[str], keep: int = 0) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def write(
        self,
        step: int,
        config: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        extra: dict[str, Any],
    ) -> Path:
        """Write atomically, then move the pointer, then prune (a crash leaves a valid latest)."""
        path = write_checkpoint(self.path_for(step), config, state_dict, extra)
        temporary = self.directory / f".{self.POINTER}.tmp"
        temporary.write_text(path.name + "\n", encoding="utf-8")
        os.replace(temporary, self.directory / self.POINTER)
        self._prune(keep_path=path)
        return path

    def steps(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = self._PATTERN.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint the pointer names, else the newest step file, else None."""
        pointer = self.directory / self.POINTER
        if pointer.is_file():
            named = self.directory / pointer.read_text(encoding="utf-8").strip()
            if named.is_file():
                return named
        steps = self.steps()
        return steps[-1][1] if steps else None

    def _prune(self, keep_path: Path) -> None:
        if self.keep <= 0:
            return
        old = [path for _, path in self.steps()[: -self.keep] if path != keep_path]
        for path in old:
            path.unlink(missing_ok=True)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the latest one under a run directory or its ``checkpoints/``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for directory in (path, path / "checkpoints"):
            latest = CheckpointStore(directory).latest()
            if latest is not None:
                return latest
        raise CheckpointError(f"no checkpoint found in {str(path)!r} or its checkpoints/")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


# --------------------------------------------------------------------------------------------
# Building the model


def build_model(
    section: ModelSection,
    *,
    grad_checkpointing: bool = False,
    registry: Registry | None = None,
) -> PeaceModel:
    """The model a :class:`ModelSection` describes (see its docstring), fp32, in train mode."""
    registry = registry or get_registry()
    overrides = dict(section.overrides)
    if grad_checkpointing:
        overrides["grad_checkpointing"] = True
    if section.init_from is None:
        config = resolve_config(section.architecture(), section.modalities, registry, **overrides)
        config = _with_options(config, section, registry)
        return create_model(config, registry=registry).train()
    source = find_checkpoint(section.init_from)
    converted = convert_checkpoint(source, registry)
    base = _merge_init_config(section, converted.config, registry)
    config = resolve_config(base, section.modalities, registry, **overrides)
    config = _with_options(config, section, registry)
    merged = ConvertedCheckpoint(
        config=config.model_dump(mode="json"),
        state_dict=converted.state_dict,
        mapped=converted.mapped,
        ignored=converted.ignored,
        source_format=converted.source_format,
    )
    with warnings.catch_warnings():
        # New modalities are expected to be missing from the file: they start fresh.
        warnings.filterwarnings("ignore", message=r".*keep a fresh initialisation")
        model = model_from_converted(
            merged,
            section.modalities,
            dtype=torch.float32,
            strict=False,
            registry=registry,
            source=str(source),
        )
    return model.train()


def _with_options(config: ModelConfig, section: ModelSection, registry: Registry) -> ModelConfig:
    """``config`` with ``section.options`` merged into its modalities' option dicts."""
    if not section.options:
        return config
    unknown = sorted(set(section.options) - set(config.modalities))
    if unknown:
        raise ValueError(
            f"model.options names modalities {unknown} that the model does not have; it has "
            f"{sorted(config.modalities)}"
        )
    raw = config.model_dump(mode="json")
    for name, changes in section.options.items():
        raw["modalities"][name] = {**raw["modalities"][name], **changes}
    return resolve_config(raw, registry=registry)


def _merge_init_config(
    section: ModelSection, checkpoint_config: Mapping[str, Any], registry: Registry
) -> dict[str, Any]:
    """The checkpoint's config, plus options for new modalities from ``preset``/``config``."""
    base = copy.deepcopy(dict(checkpoint_config))
    base["modalities"] = dict(base.get("modalities") or {})
    architecture = section.architecture()
    if architecture is None:
        return base
    reference: ModelConfig = resolve_config(architecture, registry=registry)
    saved = EncoderConfig.model_validate(base.get("encoder") or {})
    differing = [
        f"{name} ({getattr(reference.encoder, name)} vs {getattr(saved, name)})"
        for name in _STRUCTURAL_ENCODER_FIELDS
        if getattr(reference.encoder, name) != getattr(saved, name)
    ]
    if differing:
        raise ValueError(
            f"model.init_from {section.init_from!r} has another encoder than the model "
            f"preset/config: {', '.join(differing)}; drop model.preset/config or make them match"
        )
    # Only modalities the run asks for and the checkpoint lacks take the reference's options.
    for name in section.modalities or []:
        if name not in base["modalities"] and name in reference.modalities:
            base["modalities"][name] = dict(reference.modalities[name])
    return base


def load_decoder_from(path: str | os.PathLike[str], decoder: nn.Module) -> int:
    """Copy the decoder tensors of a trainer checkpoint whose names and shapes match; return
    how many were copied (0 for files without a decoder, e.g. ``model.safetensors``)."""
    path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        return 0
    saved = read_checkpoint(path).get("decoder")
    if not isinstance(saved, Mapping):
        return 0
    own = decoder.state_dict()
    matching = {
        key: value
        for key, value in saved.items()
        if key in own and tuple(own[key].shape) == tuple(value.shape)
    }
    decoder.load_state_dict(matching, strict=False)
    return len(matching)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class TrainResult:
    """What a :meth:`Trainer.fit` call did (rank 0 holds the files and records)."""

    step: int
    losses: list[float]
    output_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    model_path: Path | None = None
    plot_path: Path | None = None
    resumed_from: Path | None = None
    data_stats: DataStats = field(default_factory=DataStats)
    summary: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        loss = self.summary.get("final_loss")
        lines = [f"pretrain: step {self.step}" + (f", loss {loss:.4f}" if loss is not None else "")]
        lines.append(self.data_stats.summary())
        for label, path in (
            ("checkpoint", self.checkpoint),
            ("model", self.model_path),
            ("plot", self.plot_path),
        ):
            if path is not None:
                lines.append(f"{label}: {path}")
        return "\n".join(lines)


def _mean_metrics(steps: list[Mapping[str, float]]) -> dict[str, float]:
    """Per-name mean over finite values (NaN where a name had none)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in steps:
        for name, value in metrics.items():
            sums.setdefault(name, 0.0)
            counts.setdefault(name, 0)
            if math.isfinite(value):
                sums[name] += value
                counts[name] += 1
    return {n: (sums[n] / counts[n] if counts[n] else math.nan) for n in sums}


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Pretrains a model as :class:`PretrainConfig` says; ``fit()`` runs to the end.

    ``resume`` names a checkpoint file or run directory to continue from (by default the
    output directory's latest checkpoint when ``config.auto_resume``). ``max_steps`` stops at
    that optimizer step (the schedule still follows ``schedule``), e.g. to split a run.
    ``progress`` shows a progress bar (default: on rank 0). ``echo`` receives status lines.
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        registry: Registry | None = None,
        resume: str | os.PathLike[str] | None = None,
        max_steps: int | None = None,
        progress: bool | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        self.config = config
        self.registry = registry or get_registry()
        self.resume = resume
        self.max_steps = max_steps
        self.progress = progress
        self._echo = echo
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.resumed_from: Path | None = None
        self._ready = False
        self._logger: MetricsLogger | None = None
        self._last_checkpoint: Path | None = None
        self._last_checkpoint_step = -1
        self._epoch_start_stats = DataStats()

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build everything and load the resume checkpoint; ``fit`` calls it when needed."""
        if self._ready:
            return
        config = self.config
        self.context = start_run(config.device)
        self.device = self.context.device
        self.precision = resolve_precision(config.precision, self.device)

        seed_everything(config.seed)  # the same initial weights on every rank
        model = build_model(
            config.model, grad_checkpointing=config.grad_checkpointing, registry=self.registry
        )
        self._check_data_modalities(model)
        self.objective = PretrainObjective(model, config.objective, registry=self.registry)
        self.decoder_loaded = 0
        if config.model.init_from is not None:
            self.decoder_loaded = load_decoder_from(config.model.init_from, self.objective.decoder)
        self.freeze_report: FreezeReport = apply_freeze(self.objective, config.freeze)
        self.objective.to(self.device).train()
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]

        self.optimizer = build_optimizer(self.objective, config.optim)
        self.loader = self._build_loader(model)
        self.schedule: ResolvedSchedule = config.schedule.resolve(self._steps_per_epoch())
        self.scheduler = build_scheduler(self.optimizer, config.optim.lr, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaled)

        rank = self.context.rank
        self.generator = torch.Generator().manual_seed(derive_seed(config.seed, rank, "masks"))
        self.data_rng = IsolatedRng()
        seed_everything(derive_seed(config.seed, rank, "training"))  # drop path etc. per rank

        self.checkpoints = CheckpointStore(self.output_dir / "checkpoints", config.keep_checkpoints)
        resume_path = self._resume_path()
        if resume_path is not None:
            self._load_checkpoint(resume_path)
        self._epoch_start_stats = copy.deepcopy(self.loader.stats)

        self.wrapped: nn.Module = self.objective
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self._find_unused_parameters(),
            )
        if self.context.is_main:
            from peace_core.config_io import save_config

            save_config(config, self.output_dir / CONFIG_FILE)
            self._logger = MetricsLogger(
                self.output_dir,
                tensorboard=config.tensorboard,
                resume_step=self.step if self.resumed_from is not None else None,
            )
        self._say(self._describe_setup())
        self._ready = True

    def _check_data_modalities(self, model: PeaceModel) -> None:
        missing = [m for m in self.config.data.modalities if m not in model.modalities]
        if missing:
            raise ValueError(
                f"the data needs modalities {missing} but the model was built with "
                f"{list(model.modalities)}; add them to model.modalities"
            )

    def _build_loader(self, model: PeaceModel) -> WebDataLoader:
        modalities = self.config.data.modalities
        preprocessors = {m: model.preprocessor(m) for m in modalities}
        extensions = {m: tuple(self.registry.modality(m).file_extensions) for m in modalities}
        return WebDataLoader(
            self.config.data,
            preprocessors,
            extensions,
            train=True,
            rank=self.context.rank,
            world_size=self.context.world_size,
            pin_memory=self.device.type == "cuda",
        )

    def _find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters a step leaves without gradient."""
        if self.config.find_unused_parameters is not None:
            return self.config.find_unused_parameters
        modalities = set(self.objective.model.modalities)
        every_batch_has_all = all(
            set(dataset.modalities) == modalities for dataset in self.config.data.datasets
        )
        # A one-modality model never aligns: its projections get no gradient.
        weights = self.config.objective.weights
        views = [*modalities, *(f"joint:{m}" for m in modalities)]
        every_term_weighted = (
            len(modalities) > 1 and weights.align > 0 and all(weights.dcl(v) > 0 for v in views)
        )
        return not (every_batch_has_all and every_term_weighted)

    def _steps_per_epoch(self) -> int | None:
        batches = self.loader.pipeline.batches_per_epoch
        if batches is None:
            return None
        return max(1, math.ceil(batches / self.config.grad_accum_steps))

    def _resume_path(self) -> Path | None:
        if self.resume is not None:
            return find_checkpoint(self.resume)
        if self.config.auto_resume:
            return self.checkpoints.latest()
        return None

    def _describe_setup(self) -> str:
        model = self.objective.model
        parts = [
            f"model {model.config.name!r} ({', '.join(model.modalities)}) on {self.device}, "
            f"precision {self.precision.name}, world size {self.context.world_size}",
            self.freeze_report.describe(),
            f"schedule: {self.schedule.total_steps} steps, warmup {self.schedule.warmup_steps}, "
            f"lr {self.config.optim.lr:g} -> {self.schedule.min_lr:g} ({self.schedule.kind})",
        ]
        if self.config.model.init_from is not None:
            parts.append(
                f"initialised from {self.config.model.init_from}"
                + (f" (+{self.decoder_loaded} decoder tensors)" if self.decoder_loaded else "")
            )
        if self.resumed_from is not None:
            parts.append(f"resumed from {self.resumed_from} at step {self.step}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------ checkpoints

    def _rank_state(self) -> dict[str, Any]:
        """What differs per rank: RNG states, data position, bad-sample counts."""
        return {
            "rng": capture_rng(),
            "masks": self.generator.get_state(),
            "data": self.loader.state_dict(),
            "data_stats": stats_to_plain(self.loader.stats),
            "data_stats_epoch_start": stats_to_plain(self._epoch_start_stats),
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call)."""
        rank_state = self._rank_state()
        states = [rank_state]
        if self.context.distributed:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, rank_state)
        path = None
        if self.context.is_main:
            model = self.objective.model
            extra = {
                "format": CHECKPOINT_FORMAT,
                "pretrain_config": self.config.model_dump(mode="json"),
                "decoder": self.objective.decoder.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "world_size": self.context.world_size,
                "ranks": states,
            }
            path = self.checkpoints.write(
                self.step, model.config.model_dump(mode="json"), model.state_dict(), extra
            )
            self._last_checkpoint = path
        self._last_checkpoint_step = self.step
        if self.context.distributed:
            dist.barrier()
        return path

    def _load_checkpoint(self, path: Path) -> None:
        checkpoint = read_checkpoint(path)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{str(path)!r} is not a pretraining checkpoint (it has no optimizer or step "
                "state); to start from its weights set model.init_from instead"
            )
        try:
            self.objective.model.load_state_dict(checkpoint["state_dict"])
            self.objective.decoder.load_state_dict(checkpoint["decoder"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[:3]
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: it does not fit this config's model, "
                f"decoder or trainable parameters ({' '.join(first)}); start a new run with "
                "another output_dir or auto_resume=false"
            ) from err
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self._apply_config_hyperparameters()
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
        self._warn_config_changes(checkpoint.get("pretrain_config") or {})
        states = checkpoint["ranks"]
        rank = self.context.rank
        if len(states) != self.context.world_size:
            self._say(
                f"warning: the checkpoint was written by {len(states)} rank(s), this run has "
                f"{self.context.world_size}; data order and randomness will not repeat exactly"
            )
        state = states[rank % len(states)]
        self.loader.load_state_dict(state["data"])
        replays = self.loader.config.resume == "exact" or not self.loader.pipeline.resampled
        # An exact resume replays the epoch from its start and counts its samples again.
        key = "data_stats_epoch_start" if replays else "data_stats"
        self.loader.stats = stats_from_plain(state[key])
        restore_rng(state["rng"])
        self.generator.set_state(state["masks"])
        self.resumed_from = path
        self._last_checkpoint = path
        self._last_checkpoint_step = self.step

    def _apply_config_hyperparameters(self) -> None:
        """After loading optimizer/scheduler state: the current config's AdamW settings and
        peak learning rate win over the saved ones (values that did not change stay bitwise
        what was saved, so an unchanged config resumes exactly)."""
        optim = self.config.optim
        for group in self.optimizer.param_groups:
            group["betas"], group["eps"] = optim.betas, optim.eps
            group["weight_decay"] = optim.weight_decay if group["group"] == "decay" else 0.0
        if any(base != optim.lr for base in self.scheduler.base_lrs):
            self.scheduler.base_lrs = [optim.lr] * len(self.optimizer.param_groups)
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = optim.lr
                group["lr"] = optim.lr * factor

    def _warn_config_changes(self, saved: Mapping[str, Any]) -> None:
        current = _flatten(self.config.model_dump(mode="json"))
        before = _flatten(dict(saved))
        changed = sorted(k for k in set(current) | set(before) if current.get(k) != before.get(k))
        if changed:
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            self._say(f"note: the config differs from the checkpoint's in: {shown}")

    # ------------------------------------------------------------------------ data

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Endless batches over epochs, drawing data randomness from :attr:`data_rng`."""
        while True:
            loader = self.loader
            epoch, started_at = loader.epoch, loader.batches_consumed
            if started_at == 0:
                self._epoch_start_stats = copy.deepcopy(loader.stats)
            seed = derive_seed(self.config.data.seed, epoch, self.context.rank, "trainer data")
            self.data_rng.reseed(seed)
            with self.data_rng.active():
                iterator = iter(loader)
            produced = 0
            try:
                while True:
                    with self.data_rng.active():
                        record = next(iterator, None)
                    if record is None:
                        break
                    produced += 1
                    yield record
            finally:
                with self.data_rng.active():
                    iterator.close()
            if produced == 0 and started_at == 0:
                raise TrainingError(
                    f"epoch {epoch} of the data yielded no batch; check data.datasets "
                    f"({loader.stats.summary()})"
                )

    def _to_device(self, batch: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        blocking = self.device.type != "cuda"
        return {
            modality: {
                key: value.to(self.device, non_blocking=not blocking)
                for key, value in tensors.items()
            }
            for modality, tensors in batch.items()
        }

    # ------------------------------------------------------------------------ training

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float], int]:
        accum = self.config.grad_accum_steps
        micro_metrics: list[dict[str, float]] = []
        samples = 0
        autocast = self.precision.autocast_dtype is not None
        for micro in range(accum):
            record = next(batches)
            batch = self._to_device(record["modalities"])
            samples += len(record.get("meta") or [])
            sync = micro == accum - 1 or not self.context.distributed
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with torch.autocast(
                    self.device.type, dtype=self.precision.autocast_dtype, enabled=autocast
                ):
                    loss, metrics = self.wrapped(batch, self.generator)
                if not torch.isfinite(loss.detach()):
                    raise TrainingError(
                        f"non-finite loss at step {self.step + 1} (batch of dataset "
                        f"{record.get('dataset')!r}): "
                        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
                    )
                self.scaler.scale(loss / accum).backward()
            micro_metrics.append(metrics)

        self.scaler.unscale_(self.optimizer)
        limit = self.config.clip_norm if self.config.clip_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, limit)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        model = self.objective.model
        clamp_logit_scale_(model.logit_scale, model.config.logit_scale_max)

        metrics = _mean_metrics(micro_metrics)
        metrics["lr"] = lr
        metrics["grad_norm"] = float(grad_norm)
        if self.precision.scaled:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        return metrics, samples

    def _data_metrics(self) -> dict[str, float]:
        stats = self.loader.stats
        metrics = {"data_ok": float(stats.ok_total), "data_bad": float(stats.bad_total)}
        for name, counts in stats.datasets.items():
            metrics[f"data_bad:{name}"] = float(counts.bad_total)
        return metrics

    def fit(self) -> TrainResult:
        """Train to ``schedule``'s end (or ``max_steps``); write the final artefacts."""
        self.setup()
        finished = False
        try:
            result = self._train()
            finished = True
            return result
        finally:
            self.close(wait_for_all=finished)

    def _train(self) -> TrainResult:
        config = self.config
        stop = self.schedule.total_steps
        if self.max_steps is not None:
            stop = min(stop, self.max_steps)
        losses: list[float] = []
        records: list[dict[str, Any]] = []
        window: list[dict[str, float]] = []
        window_samples, window_start = 0, time.perf_counter()
        run_start, run_samples = time.perf_counter(), 0
        batches = self._batches()
        bar = self._progress_bar(stop)
        try:
            while self.step < stop:
                step_start = time.perf_counter()
                metrics, samples = self._optimizer_step(batches)
                self.step += 1
                losses.append(metrics["loss"])
                window.append(metrics)
                window_samples += samples
                run_samples += samples
                rate = samples * self.context.world_size / (time.perf_counter() - step_start)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.1f}")
                if self.step % config.log_every == 0 or self.step == stop:
                    elapsed = time.perf_counter() - window_start
                    record = _mean_metrics(window)
                    record["samples_per_s"] = (
                        window_samples * self.context.world_size / max(elapsed, 1e-9)
                    )
                    record.update(self._data_metrics())
                    if self._logger is not None:
                        records.append(self._logger.log(self.step, record))
                    window, window_samples, window_start = [], 0, time.perf_counter()
                if self.step % config.checkpoint_every == 0 and self.step < stop:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            # One process: keep the progress (exact unless the interrupt came mid-step, when the
            # data stream is a few batches ahead). Under torchrun the launcher stops every rank
            # and a checkpoint would need all of them.
            if not self.context.distributed and self._last_checkpoint_step != self.step:
                path = self.save_checkpoint()
                self._say(f"interrupted at step {self.step}; checkpoint written to {path}")
            raise
        finally:
            if bar is not None:
                bar.close()
            batches.close()
        if self._last_checkpoint_step != self.step:
            self.save_checkpoint()
        return self._finish(losses, records, time.perf_counter() - run_start, run_samples)

    def _progress_bar(self, stop: int):
        show = self.progress if self.progress is not None else True
        if not (show and self.context.is_main) or self.step >= stop:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)

    def _finish(
        self, losses: list[float], records: list[dict[str, Any]], seconds: float, samples: int
    ) -> TrainResult:
        stats = self._all_ranks_stats()
        result = TrainResult(
            step=self.step,
            losses=losses,
            output_dir=self.output_dir,
            records=records,
            checkpoint=self._last_checkpoint,
            resumed_from=self.resumed_from,
            data_stats=stats,
        )
        if self.context.is_main:
            model_path = save_pretrained(self.objective.model, self.output_dir / MODEL_FILE)
            history = read_metrics(self.output_dir / METRICS_FILE)
            plot = plot_metrics(
                history, self.output_dir / PLOT_FILE, title=str(self.objective.model.config.name)
            )
            tail = losses[-max(1, self.config.log_every) :]
            result.model_path, result.plot_path = model_path, plot
            result.summary = {
                "step": self.step,
                "total_steps": self.schedule.total_steps,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "final_loss": sum(tail) / len(tail) if tail else None,
                "seconds": round(seconds, 3),
                "samples": samples * self.context.world_size,
                "trainable_parameters": self.freeze_report.trainable_count,
                "frozen_parameters": self.freeze_report.frozen_count,
                "data": stats.as_dict(),
                "checkpoint": str(self._last_checkpoint) if self._last_checkpoint else None,
                "model": str(model_path),
                "plot": str(plot) if plot else None,
            }
            from peace_core.config_io import save_config

            save_config(result.summary, self.output_dir / SUMMARY_FILE)
            self._say(result.describe())
        return result

    def _all_ranks_stats(self) -> DataStats:
        if not self.context.distributed:
            return copy.deepcopy(self.loader.stats)
        gathered: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(gathered, self.loader.stats)
        total = DataStats()
        for stats in gathered:
            total.merge(stats)
        return total

    def close(self, *, wait_for_all: bool = True) -> None:
        """Close the metrics files and end a process group this trainer started.

        ``wait_for_all`` synchronises the ranks first (skipped after an error, when the other
        ranks may never arrive)."""
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        context = getattr(self, "context", None)
        if context is None or not context.distributed or not dist.is_initialized():
            return
        # Every rank waits for rank 0's final writes, and the DDP wrapper (which holds the
        # process group) goes first: tearing the group down under it can hang at exit.
        if wait_for_all:
            dist.barrier()
        if hasattr(self, "objective"):
            self.wrapped = self.objective
        if context.started_process_group:
            dist.destroy_process_group()
            context.started_process_group = False

    def _say(self, message: str) -> None:
        if getattr(self, "context", None) is not None and not self.context.is_main:
            return
        if self._echo is not None:
            self._echo(message)
            return
        from tqdm.auto import tqdm

        for line in message.splitlines():
            tqdm.write(line)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def pretrain(
    config: PretrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    registry: Registry | None = None,
) -> TrainResult:
    """Run a whole pretraining job (``peace pretrain``)."""
    trainer = Trainer(
        config, registry=registry, resume=resume, max_steps=max_steps, progress=progress
    )
    return trainer.fit()
