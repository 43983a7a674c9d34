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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peace_core.checkpoint import CheckpointError, read_checkpoint
from peace_core.data.pipeline import WebDataLoader, derive_seed, raw_samples
from peace_core.data.stats import DataStats
from peace_core.factory import (
    save_pretrained,
)
from peace_core.losses import clamp_logit_scale_
from peace_core.model import PeaceModel
from peace_core.pretrain.build import build_model, load_decoder_from
from peace_core.pretrain.checkpoints import (
    CheckpointStore,
    find_checkpoint,
    stats_from_plain,
    stats_to_plain,
)
from peace_core.pretrain.collapse import CollapseGuard, patience_for
from peace_core.pretrain.config import PretrainConfig
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
from peace_core.pretrain.runtime import (
    IsolatedRng,
    capture_rng,
    resolve_precision,
    restore_rng,
    seed_everything,
    start_run,
)
from peace_registry import Registry, get_registry
from peace_registry.errors import PeaceError

#: Marks a trainer checkpoint (a native checkpoint plus the state needed to resume).
CHECKPOINT_FORMAT = "peace-pretrain/1"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"


class TrainingError(PeaceError, RuntimeError):
    """Training cannot go on (non-finite loss, no data, an unusable checkpoint...)."""


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
        #: Collapse warnings printed during this run (also in summary.json).
        self.collapse_warnings: list[str] = []

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
            config.model,
            grad_checkpointing=config.grad_checkpointing,
            registry=self.registry,
            samples=partial(raw_samples, config.data),
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
        guard = CollapseGuard(
            warmup_steps=self.schedule.warmup_steps,
            patience_steps=patience_for(self.schedule.total_steps, self.config.log_every),
        )
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
                    for warning in guard.check(self.step, record):
                        self.collapse_warnings.append(warning)
                        self._say(warning)
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
                "collapse_warnings": list(self.collapse_warnings),
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
