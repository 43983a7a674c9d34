"""The state of a pretraining run and its checkpoints: writing, pruning, finding, resuming.

A run directory keeps its checkpoints in ``checkpoints/step_00001000.pt`` with a ``latest``
pointer, written atomically (file, then pointer, then pruning, so a crash leaves a valid latest).
A checkpoint is a native checkpoint (:mod:`peace_core.checkpoint`, the file layer) whose extra
entries hold the decoder, optimizer, scheduler, scaler, step and, for every rank, its data
position, bad-sample counts and RNG states (python, numpy, torch CPU/CUDA, the masking
generator). Everything is plain containers and tensors: checkpoints load ``weights_only``.

On resume the saved state is restored as it was, except that the current config's AdamW
settings and peak learning rate win (values that did not change stay bitwise what was saved, so
an unchanged config resumes exactly), and the user is told which config fields changed.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from peace_core.checkpoint import (
    NATIVE_FORMAT_VERSION,
    CheckpointError,
    checksum_path,
    read_checkpoint,
    verify_checksum,
    write_checkpoint,
)
from peace_core.data.pipeline import WebDataLoader
from peace_core.data.stats import DatasetCounts, DataStats
from peace_core.pretrain.config import PretrainConfig
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.optim import OptimConfig
from peace_core.pretrain.runtime import RunContext, capture_rng, restore_rng
from peace_core.pretrain.strategy import TrainingStrategy
from peace_core.sharded_checkpoint import (
    PARTIAL_SUFFIX,
    is_sharded_checkpoint,
    load_sharded,
    read_trainer_state,
    remove_sharded,
    save_sharded,
    verify_sharded,
)

#: Marks a trainer checkpoint (a native checkpoint plus the state needed to resume).
CHECKPOINT_FORMAT = "peace-pretrain/1"
#: The same, sharded over the ranks of an FSDP run (:mod:`peace_core.sharded_checkpoint`).
SHARDED_CHECKPOINT_FORMAT = "peace-pretrain-sharded/1"
CHECKPOINTS_DIR = "checkpoints"

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
    """Step checkpoints in one directory (``step_00001000.pt`` files, or ``step_00001000/``
    sharded directories), a ``latest`` pointer, and pruning."""

    POINTER = "latest"
    _PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")

    def __init__(self, directory: str | os.PathLike[str], keep: int = 0) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int, *, sharded: bool = False) -> Path:
        return self.directory / (f"step_{step:08d}" if sharded else f"step_{step:08d}.pt")

    def write(
        self,
        step: int,
        config: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        extra: dict[str, Any],
    ) -> Path:
        """Write atomically, then move the pointer, then prune (a crash leaves a valid latest)."""
        path = write_checkpoint(self.path_for(step), config, state_dict, extra, checksum=True)
        self.commit(path)
        return path

    def remove_debris(self) -> None:
        """Delete what a process killed mid-write left: temp files and ``.partial`` directories
        (only the run's rank 0 writes here, so nothing else is writing them now)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(".step_*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.directory.glob(f"step_*{PARTIAL_SUFFIX}"):
            remove_sharded(path)

    def commit(self, path: Path) -> None:
        """Point ``latest`` at the finished checkpoint ``path``, then prune older ones."""
        temporary = self.directory / f".{self.POINTER}.tmp"
        temporary.write_text(path.name + "\n", encoding="utf-8")
        os.replace(temporary, self.directory / self.POINTER)
        self._prune(keep_path=path)

    def steps(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = self._PATTERN.match(path.name)
            if match and _is_checkpoint(path):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def newest_first(self) -> list[Path]:
        """Every step checkpoint, the one the pointer names first, then newest to oldest."""
        steps = [path for _, path in reversed(self.steps())]
        latest = self.latest()
        return [latest, *(p for p in steps if p != latest)] if latest is not None else steps

    def latest(self) -> Path | None:
        """The checkpoint the pointer names, else the newest step checkpoint, else None."""
        pointer = self.directory / self.POINTER
        if pointer.is_file():
            named = self.directory / pointer.read_text(encoding="utf-8").strip()
            if _is_checkpoint(named):
                return named
        steps = self.steps()
        return steps[-1][1] if steps else None

    def _prune(self, keep_path: Path) -> None:
        if self.keep <= 0:
            return
        old = [path for _, path in self.steps()[: -self.keep] if path != keep_path]
        for path in old:
            if path.is_dir():
                remove_sharded(path)
            else:
                path.unlink(missing_ok=True)
                checksum_path(path).unlink(missing_ok=True)


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_sharded_checkpoint(path)


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when the checkpoint at ``path`` matches the checksums written with it."""
    return verify_sharded(path) if path.is_dir() else verify_checksum(path)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint (file or sharded directory), or the latest one under a run directory or its
    ``checkpoints/``."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    if path.is_dir():
        for directory in (path, path / CHECKPOINTS_DIR):
            latest = CheckpointStore(directory).latest()
            if latest is not None:
                return latest
        raise CheckpointError(f"no checkpoint found in {str(path)!r} or its checkpoints/")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


# --------------------------------------------------------------------------------------------
# Resuming


def apply_config_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, optim: OptimConfig
) -> None:
    """After loading optimizer/scheduler state: ``optim``'s AdamW settings and peak learning
    rate win over the saved ones (values that did not change stay bitwise what was saved, so
    an unchanged config resumes exactly)."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = optim.betas, optim.eps
        group["weight_decay"] = optim.weight_decay if group["group"] == "decay" else 0.0
    if any(base != optim.lr for base in scheduler.base_lrs):
        scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"] = optim.lr
            group["lr"] = optim.lr * factor


def config_changes(current: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """The dotted names of the fields that differ between two dumped configs, sorted."""
    now, before = _flatten(current), _flatten(saved)
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))


def _load_file_training(checkpoint: Mapping[str, Any], parts: Resumable) -> None:
    parts.objective.model.load_state_dict(checkpoint["state_dict"])
    parts.objective.decoder.load_state_dict(checkpoint["decoder"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])


def _load_sharded_training(path: Path, trainer: Mapping[str, Any], parts: Resumable) -> None:
    """Weights and optimizer state from a sharded checkpoint, resharded onto this run (FSDP on
    any number of ranks, or full copies)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(parts.objective, parts.optimizer)
    load_sharded(path, {"objective": model_state, "optimizer": optimizer_state["state"]})
    saved_groups = trainer["param_groups"]
    current_groups = optimizer_state["param_groups"]
    if [g["params"] for g in saved_groups] != [g["params"] for g in current_groups]:
        raise ValueError("the trainable parameters differ from the checkpoint's")
    optimizer_state["param_groups"] = saved_groups
    set_state_dict(
        parts.objective,
        parts.optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
    )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Resumable(Protocol):
    """The pieces of a training loop that a checkpoint saves and restores."""

    context: RunContext
    objective: PretrainObjective
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    loader: WebDataLoader
    generator: torch.Generator  # the masking generator
    strategy: TrainingStrategy


class RunState:
    """Where a run stands (its step, its last checkpoint, where it resumed from) and how it gets
    to and from its checkpoints.

    Every rank holds one; :meth:`save` and :meth:`resume` must be called by all of them (rank 0
    writes the files). ``say`` receives the notes for the user (config changes on resume).
    """

    def __init__(self, config: PretrainConfig, *, say: Callable[[str], None]) -> None:
        self.config = config
        self.store = CheckpointStore(
            Path(config.output_dir) / CHECKPOINTS_DIR, config.keep_checkpoints
        )
        self._say = say
        #: Optimizer steps done.
        self.step = 0
        self.resumed_from: Path | None = None
        #: The newest checkpoint written or resumed from (rank 0 knows written paths).
        self.last_checkpoint: Path | None = None
        self._last_checkpoint_step = -1
        #: The data counts when the current epoch started: an exact resume replays the epoch
        #: from there.
        self.epoch_start_stats = DataStats()

    @property
    def saved(self) -> bool:
        """Whether the current step has a checkpoint already."""
        return self._last_checkpoint_step == self.step

    def mark_epoch_start(self, stats: DataStats) -> None:
        self.epoch_start_stats = copy.deepcopy(stats)

    def resume_path(self, resume: str | os.PathLike[str] | None) -> Path | None:
        """The checkpoint to resume from: ``resume`` when it names a checkpoint, else the newest
        intact one of a run directory (``resume``, or the output directory when auto-resuming).

        A checkpoint whose checksum does not match is refused when named; in a run directory
        the previous one is taken instead, and the user is told."""
        if resume is not None and _is_checkpoint(Path(resume)):
            problem = verify_checkpoint(Path(resume))
            if problem is not None:
                raise CheckpointError(f"cannot resume: {problem}")
            return Path(resume)
        if resume is None and not self.config.auto_resume:
            return None
        if resume is None:
            candidates = self.store.newest_first()
        else:
            stores = [
                CheckpointStore(Path(resume)),
                CheckpointStore(Path(resume) / CHECKPOINTS_DIR),
            ]
            candidates = next((c for c in (s.newest_first() for s in stores) if c), [])
            if not candidates:
                find_checkpoint(resume)  # raises, saying what is missing
        for path in candidates:
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            self._say(f"warning: {problem}; trying the checkpoint before it")
        if candidates:
            raise CheckpointError(
                f"no intact checkpoint in {str(candidates[0].parent)!r}: every one failed its "
                "checksum (see the warnings above)"
            )
        return None

    def resume(self, parts: Resumable, resume: str | os.PathLike[str] | None) -> Path | None:
        """Load the checkpoint :meth:`resume_path` finds into ``parts`` (if there is one)."""
        path = self.resume_path(resume)
        if path is not None:
            self.load(path, parts)
        return path

    # ------------------------------------------------------------------------ writing

    def rank_state(self, parts: Resumable) -> dict[str, Any]:
        """What differs per rank: RNG states, data position, bad-sample counts."""
        return {
            "rng": capture_rng(),
            "masks": parts.generator.get_state(),
            "data": parts.loader.state_dict(),
            "data_stats": stats_to_plain(parts.loader.stats),
            "data_stats_epoch_start": stats_to_plain(self.epoch_start_stats),
        }

    def save(self, parts: Resumable) -> Path | None:
        """Write a checkpoint of the current step (every rank must call; rank 0 gets the path).

        Sharded runs (FSDP) write a sharded directory, every rank its own shards; otherwise
        rank 0 writes one file."""
        context = parts.context
        rank_state = self.rank_state(parts)
        states: list[Any] = [rank_state]
        if context.distributed:
            states = [None] * context.world_size
            dist.all_gather_object(states, rank_state)
        common = {
            "pretrain_config": self.config.model_dump(mode="json"),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "step": self.step,
            "world_size": context.world_size,
            "ranks": states,
        }
        model_config = parts.objective.model.config.model_dump(mode="json")
        if context.is_main:
            self.store.remove_debris()
        path = None
        if parts.strategy.sharded:
            path = self._save_sharded(parts, common, model_config)
        elif context.is_main:
            model = parts.objective.model
            extra = {
                "format": CHECKPOINT_FORMAT,
                **common,
                "decoder": parts.objective.decoder.state_dict(),
                "optimizer": parts.optimizer.state_dict(),
            }
            path = self.store.write(self.step, model_config, model.state_dict(), extra)
        if context.is_main:
            self.last_checkpoint = path
        else:
            path = None
        self._last_checkpoint_step = self.step
        if context.distributed:
            dist.barrier()
        return path

    def _save_sharded(
        self, parts: Resumable, common: dict[str, Any], model_config: dict[str, Any]
    ) -> Path:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(parts.objective, parts.optimizer)
        tensors = {"objective": model_state, "optimizer": optimizer_state["state"]}
        trainer = {
            "format": SHARDED_CHECKPOINT_FORMAT,
            "peace_format": NATIVE_FORMAT_VERSION,
            "config": model_config,
            **common,
            "param_groups": optimizer_state["param_groups"],
        }
        final = self.store.path_for(self.step, sharded=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        path = save_sharded(final, tensors, trainer if parts.context.is_main else None)
        if parts.context.is_main:
            self.store.commit(path)
        return path

    # ------------------------------------------------------------------------ reading

    def load(self, path: Path, parts: Resumable) -> None:
        """Restore ``parts`` and this state from the checkpoint at ``path``: a file, or a
        sharded directory (written by any number of ranks, read by this run's)."""
        if is_sharded_checkpoint(path):
            checkpoint = read_trainer_state(path)
            load_weights = partial(_load_sharded_training, path, checkpoint)
        else:
            if parts.strategy.sharded:
                raise CheckpointError(
                    f"cannot resume a sharded (fsdp) run from the single file {str(path)!r}; "
                    "start from its weights with model.init_from, or resume it with "
                    "distributed.strategy 'ddp'"
                )
            checkpoint = read_checkpoint(path)
            load_weights = partial(_load_file_training, checkpoint)
        if checkpoint.get("format") not in (CHECKPOINT_FORMAT, SHARDED_CHECKPOINT_FORMAT):
            raise CheckpointError(
                f"{str(path)!r} is not a pretraining checkpoint (it has no optimizer or step "
                "state); to start from its weights set model.init_from instead"
            )
        try:
            load_weights(parts)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[:3]
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: it does not fit this config's model, "
                f"decoder or trainable parameters ({' '.join(first)}); start a new run with "
                "another output_dir or auto_resume=false"
            ) from err
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        apply_config_hyperparameters(parts.optimizer, parts.scheduler, self.config.optim)
        if checkpoint.get("scaler"):
            parts.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
        changed = config_changes(
            self.config.model_dump(mode="json"), checkpoint.get("pretrain_config") or {}
        )
        if changed:
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            self._say(f"note: the config differs from the checkpoint's in: {shown}")
        self._load_rank_state(checkpoint["ranks"], parts)
        self.resumed_from = path
        self.last_checkpoint = path
        self._last_checkpoint_step = self.step

    def _load_rank_state(self, states: list[dict[str, Any]], parts: Resumable) -> None:
        context, loader = parts.context, parts.loader
        if len(states) != context.world_size:
            self._say(
                f"warning: the checkpoint was written by {len(states)} rank(s), this run has "
                f"{context.world_size}; data order and randomness will not repeat exactly"
            )
        state = states[context.rank % len(states)]
        loader.load_state_dict(state["data"])
        replays = loader.config.resume == "exact" or not loader.pipeline.resampled
        # An exact resume replays the epoch from its start and counts its samples again.
        key = "data_stats_epoch_start" if replays else "data_stats"
        loader.stats = stats_from_plain(state[key])
        restore_rng(state["rng"])
        parts.generator.set_state(state["masks"])
