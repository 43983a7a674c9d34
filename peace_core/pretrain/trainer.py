"""The pretraining loop: ``Trainer(config).fit()`` (DESIGN §5, spec §3.5–3.7).

One optimizer step = ``grad_accum_steps`` micro-batches through :class:`PretrainObjective`
(autocast on GPU), gradient unscaling and clipping, AdamW, the warmup + cosine schedule, and the
``logit_scale`` clamp. The trainer builds the model, objective (with freezing), optimizer and
data loader, and runs the steps; the run's checkpoints and resume are
:mod:`peace_core.pretrain.run_state`'s, its metrics, progress bar, final files and messages
:mod:`peace_core.pretrain.artefacts`'.

Exact resume. A checkpoint holds, for every rank, its data position and RNG states. The data
stream draws its randomness (augmentations in the main process, the DataLoader's base seed)
from its OWN set of global RNG states, swapped in around every batch and reseeded from (data
seed, epoch, rank) at each epoch start, so replaying the consumed part of an epoch on resume
repeats the same draws and leaves the training RNG untouched. On CPU, N steps, stop, resume, N
steps equals 2N uninterrupted steps bit for bit.

Distributed. With ``WORLD_SIZE > 1`` (torchrun) the process group is started (gloo on CPU, nccl
on CUDA) and ``distributed.strategy`` spreads the step (:mod:`peace_core.pretrain.strategy`):
``ddp`` wraps the objective in ``DistributedDataParallel``; ``fsdp`` shards it with FSDP2 and
every rank writes its shards of each checkpoint (:mod:`peace_core.sharded_checkpoint`). Only
rank 0 logs and writes the other files; logged metrics are rank 0's.
"""

from __future__ import annotations

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
from torch.optim.lr_scheduler import LambdaLR

from peace_core.data.pipeline import WebDataLoader, derive_seed, raw_samples
from peace_core.data.stats import DataStats
from peace_core.losses import clamp_logit_scale_
from peace_core.model import PeaceModel
from peace_core.pretrain.artefacts import RunArtefacts, TrainResult
from peace_core.pretrain.build import build_model, load_decoder_from
from peace_core.pretrain.config import PretrainConfig
from peace_core.pretrain.freeze import FreezeReport, apply_freeze
from peace_core.pretrain.logging import mean_metrics
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.optim import ResolvedSchedule, build_optimizer, build_scheduler
from peace_core.pretrain.run_state import RunState
from peace_core.pretrain.runtime import (
    IsolatedRng,
    Precision,
    RunContext,
    resolve_precision,
    seed_everything,
    start_run,
)
from peace_core.pretrain.signals import StopRequests
from peace_core.pretrain.strategy import TrainingStrategy, build_strategy
from peace_core.threads import ThreadPlan, apply_threads, plan_threads
from peace_registry import Registry, get_registry
from peace_registry.errors import PeaceError

__all__ = ["TrainResult", "Trainer", "TrainingError", "TrainingParts", "pretrain"]


class TrainingError(PeaceError, RuntimeError):
    """Training cannot go on (non-finite loss, no data, an unusable checkpoint...)."""


@dataclass
class TrainingParts:
    """What :meth:`Trainer.setup` builds (a :class:`~peace_core.pretrain.run_state.Resumable`:
    checkpoints save and restore its stateful pieces)."""

    context: RunContext
    threads: ThreadPlan
    precision: Precision
    objective: PretrainObjective
    #: The objective, or its DistributedDataParallel wrapper: what a step calls.
    wrapped: nn.Module
    trainable: list[nn.Parameter]
    freeze_report: FreezeReport
    #: Decoder tensors taken from ``model.init_from``.
    decoder_loaded: int
    optimizer: torch.optim.Optimizer
    schedule: ResolvedSchedule
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    loader: WebDataLoader
    #: Draws the masks.
    generator: torch.Generator
    #: The data stream's own global RNG states.
    data_rng: IsolatedRng
    #: How the step is spread over ranks (one process, ddp or fsdp).
    strategy: TrainingStrategy

    @property
    def device(self) -> torch.device:
        return self.context.device


@dataclass
class StepOutcome:
    """One optimizer step as :meth:`Trainer._optimizer_step` ran it."""

    samples: int
    keys: list[str]
    datasets: list[str]
    #: Every rank saw a stop request (a signal) by the end of this step.
    stop: bool = False
    #: ``"loss"`` or ``"gradient"`` when the update was dropped as non-finite.
    fault: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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
        self.output_dir = Path(config.output_dir)
        self.artefacts = RunArtefacts(config, progress=progress, echo=echo)
        self.state = RunState(config, say=self.artefacts.say)
        self._parts: TrainingParts | None = None  # built by setup()
        self._context: RunContext | None = None  # known as soon as the run has started
        self._stop = StopRequests()
        #: Steps whose update was dropped for a non-finite loss or gradient (rank 0's view).
        self.skipped_steps: list[dict[str, Any]] = []

    # The built pieces, and the names callers used before the run state and artefacts moved out.

    @property
    def parts(self) -> TrainingParts:
        if self._parts is None:
            raise RuntimeError("the trainer is not set up yet; call setup() or fit()")
        return self._parts

    @property
    def objective(self) -> PretrainObjective:
        return self.parts.objective

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer

    @property
    def decoder_loaded(self) -> int:
        return self.parts.decoder_loaded

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def resumed_from(self) -> Path | None:
        return self.state.resumed_from

    @property
    def collapse_warnings(self) -> list[str]:
        """Collapse warnings printed during this run (also in summary.json)."""
        return self.artefacts.collapse_warnings

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build everything and load the resume checkpoint; ``fit`` calls it when needed."""
        if self._parts is not None:
            return
        try:
            parts = self._build()
            self.state.resume(parts, self.resume)
        except BaseException:
            self.close(wait_for_all=False)  # ends a process group the build started
            raise
        self.state.mark_epoch_start(parts.loader.stats)
        parts.wrapped = parts.strategy.wrap(
            parts.objective,
            find_unused_parameters=self._find_unused_parameters(parts.objective),
        )
        resumed = self.state.resumed_from is not None
        self.artefacts.open(resumed_at=self.state.step if resumed else None)
        self._parts = parts
        self.artefacts.say(self._describe_setup(parts))

    def _build(self) -> TrainingParts:
        # Keep the order: the global RNG draws (initial weights, then the per-rank training
        # stream) must not move, or runs and their resumes stop repeating.
        config = self.config
        context = start_run(config.device, always_group=config.distributed.strategy == "fsdp")
        self._context = context
        self.artefacts.attach(context)
        threads = plan_threads(data_workers=config.data.workers, threads=config.threads)
        apply_threads(threads)
        device = context.device
        precision = resolve_precision(config.precision, device)
        strategy = build_strategy(config.distributed, context, precision)

        seed_everything(config.seed)  # the same initial weights on every rank
        model = build_model(
            config.model,
            grad_checkpointing=config.grad_checkpointing,
            registry=self.registry,
            samples=partial(raw_samples, config.data),
        )
        self._check_data_modalities(model)
        objective = PretrainObjective(model, config.objective)
        decoder_loaded = 0
        if config.model.init_from is not None:
            decoder_loaded = load_decoder_from(config.model.init_from, objective.decoder)
        freeze_report = apply_freeze(objective, config.freeze)
        objective.to(device).train()
        strategy.prepare(objective)  # FSDP shards before the optimizer sees the parameters

        optimizer = build_optimizer(objective, config.optim)
        loader = self._build_loader(model, context, threads.data_workers)
        schedule = config.schedule.resolve(self._steps_per_epoch(loader))
        masks_seed = derive_seed(config.seed, context.rank, "masks")
        parts = TrainingParts(
            context=context,
            threads=threads,
            precision=precision,
            objective=objective,
            wrapped=objective,
            trainable=[p for p in objective.parameters() if p.requires_grad],
            freeze_report=freeze_report,
            decoder_loaded=decoder_loaded,
            optimizer=optimizer,
            schedule=schedule,
            scheduler=build_scheduler(optimizer, config.optim.lr, schedule),
            scaler=torch.amp.GradScaler(device.type, enabled=precision.scaled),
            loader=loader,
            generator=torch.Generator().manual_seed(masks_seed),
            data_rng=IsolatedRng(),
            strategy=strategy,
        )
        seed_everything(derive_seed(config.seed, context.rank, "training"))  # drop path etc.
        return parts

    def _check_data_modalities(self, model: PeaceModel) -> None:
        missing = [m for m in self.config.data.modalities if m not in model.modalities]
        if missing:
            raise ValueError(
                f"the data needs modalities {missing} but the model was built with "
                f"{list(model.modalities)}; add them to model.modalities"
            )

    def _build_loader(self, model: PeaceModel, context: RunContext, workers: int) -> WebDataLoader:
        modalities = self.config.data.modalities
        preprocessors = {m: model.preprocessor(m) for m in modalities}
        extensions = {m: tuple(model.spec(m).file_extensions) for m in modalities}
        return WebDataLoader(
            self.config.data.model_copy(update={"workers": workers}),
            preprocessors,
            extensions,
            train=True,
            rank=context.rank,
            world_size=context.world_size,
            pin_memory=context.device.type == "cuda",
        )

    def _steps_per_epoch(self, loader: WebDataLoader) -> int | None:
        batches = loader.pipeline.batches_per_epoch
        if batches is None:
            return None
        return max(1, math.ceil(batches / self.config.grad_accum_steps))

    def _find_unused_parameters(self, objective: PretrainObjective) -> bool:
        """Whether DDP must look for parameters a step leaves without gradient."""
        if self.config.find_unused_parameters is not None:
            return self.config.find_unused_parameters
        modalities = set(objective.model.modalities)
        every_batch_has_all = all(
            set(dataset.modalities) == modalities for dataset in self.config.data.datasets
        )
        # A one-modality model never aligns: its projections get no gradient.
        weights, anchor = self.config.objective.weights, self.config.objective.anchor
        views = [*modalities, *(f"joint:{m}" for m in modalities)]
        every_term_weighted = (
            len(modalities) > 1
            and weights.align > 0
            and all(weights.dcl(v, anchor) > 0 for v in views)
        )
        return not (every_batch_has_all and every_term_weighted)

    def _describe_setup(self, parts: TrainingParts) -> str:
        model, schedule = parts.objective.model, parts.schedule
        lines = [
            f"model {model.config.name!r} ({', '.join(model.modalities)}) on {parts.device}, "
            f"precision {parts.precision.name}, world size {parts.context.world_size}",
            parts.threads.describe(),
            parts.strategy.describe(),
            parts.freeze_report.describe(),
            f"schedule: {schedule.total_steps} steps, warmup {schedule.warmup_steps}, "
            f"lr {self.config.optim.lr:g} -> {schedule.min_lr:g} ({schedule.kind})",
        ]
        if self.config.model.init_from is not None:
            loaded = parts.decoder_loaded
            lines.append(
                f"initialised from {self.config.model.init_from}"
                + (f" (+{loaded} decoder tensors)" if loaded else "")
            )
        if self.state.resumed_from is not None:
            lines.append(f"resumed from {self.state.resumed_from} at step {self.state.step}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------ data

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Endless batches over epochs, drawing data randomness from the parts' ``data_rng``."""
        loader, data_rng = self.parts.loader, self.parts.data_rng
        while True:
            epoch, started_at = loader.epoch, loader.batches_consumed
            if started_at == 0:
                self.state.mark_epoch_start(loader.stats)
            rank = self.parts.context.rank
            data_rng.reseed(derive_seed(self.config.data.seed, epoch, rank, "trainer data"))
            with data_rng.active():
                iterator = iter(loader)
            produced = 0
            try:
                while True:
                    with data_rng.active():
                        record = next(iterator, None)
                    if record is None:
                        break
                    produced += 1
                    yield record
            finally:
                with data_rng.active():
                    iterator.close()
            if produced == 0 and started_at == 0:
                raise TrainingError(
                    f"epoch {epoch} of the data yielded no batch; check data.datasets "
                    f"({loader.stats.summary()})"
                )

    def _to_device(self, batch: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        device = self.parts.device
        blocking = device.type != "cuda"
        return {
            modality: {
                key: value.to(device, non_blocking=not blocking) for key, value in tensors.items()
            }
            for modality, tensors in batch.items()
        }

    # ------------------------------------------------------------------------ training

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> StepOutcome:
        parts = self.parts
        accum = self.config.grad_accum_steps
        micro_metrics: list[dict[str, float]] = []
        samples, keys, datasets = 0, [], []
        finite_loss = True
        autocast = parts.precision.autocast_dtype is not None
        for micro in range(accum):
            record = next(batches)
            batch = self._to_device(record["modalities"])
            meta = record.get("meta") or []
            samples += len(meta)
            keys += [str(m.get("key")) for m in meta if isinstance(m, Mapping)]
            datasets.append(str(record.get("dataset")))
            with parts.strategy.micro_batch(parts.wrapped, sync=micro == accum - 1):
                with torch.autocast(
                    parts.device.type, dtype=parts.precision.autocast_dtype, enabled=autocast
                ):
                    loss, metrics = parts.wrapped(batch, parts.generator)
                finite_loss = finite_loss and bool(torch.isfinite(loss.detach()))
                # A non-finite loss is still sent backward: every rank must take part in the
                # gradient collectives; the step is dropped below.
                parts.scaler.scale(loss / accum).backward()
            micro_metrics.append(metrics)

        parts.strategy.finish_gradients(parts.objective)
        parts.scaler.unscale_(parts.optimizer)
        limit = self.config.clip_norm if self.config.clip_norm is not None else math.inf
        grad_norm = parts.strategy.clip_grad_norm(parts.trainable, limit)
        # Under fp16 the loss scaler owns overflowing gradients (it skips and lowers the scale).
        finite_grads = math.isfinite(grad_norm) or parts.precision.scaled
        bad_loss, bad_grads, stop = self._agree(
            not finite_loss, not finite_grads, self._stop.received is not None
        )
        outcome = StepOutcome(samples=samples, keys=keys, datasets=datasets, stop=stop)
        if bad_loss or bad_grads:
            parts.optimizer.zero_grad(set_to_none=True)
            if parts.precision.scaled:
                parts.scaler.update()  # lowers the scale after the overflow unscale_ saw
            outcome.fault = "loss" if bad_loss else "gradient"
            outcome.metrics = mean_metrics(micro_metrics)
            return outcome
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scheduler.step()
        model = parts.objective.model
        clamp_logit_scale_(model.logit_scale, model.config.logit_scale_max)

        metrics = mean_metrics(micro_metrics)
        metrics["lr"] = lr
        metrics["grad_norm"] = float(grad_norm)
        if parts.precision.scaled:
            metrics["loss_scale"] = float(parts.scaler.get_scale())
        outcome.metrics = metrics
        return outcome

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag raised on any rank (every rank must call, once per step)."""
        context = self.parts.context
        if not context.distributed:
            return flags
        raised = torch.tensor([float(f) for f in flags], device=self.parts.device)
        dist.all_reduce(raised, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in raised.tolist())

    def _skip(self, outcome: StepOutcome, in_a_row: int) -> None:
        """Drop a step with a non-finite loss or gradient; stop after too many in a row."""
        attempt = self.state.step + 1
        shown = ", ".join(outcome.keys[:8]) + (" ..." if len(outcome.keys) > 8 else "")
        self.skipped_steps.append(
            {
                "step": attempt,
                "fault": outcome.fault,
                "datasets": outcome.datasets,
                "keys": outcome.keys,
            }
        )
        self.artefacts.say(
            f"warning: skipped the update of step {attempt}: non-finite {outcome.fault} "
            f"(on this or another rank; this rank's samples: {shown or 'unknown'})"
        )
        limit = self.config.max_skipped_steps
        if in_a_row >= limit:
            steps = ", ".join(f"{s['step']} ({s['fault']})" for s in self.skipped_steps[-limit:])
            raise TrainingError(
                f"stopping: {limit} steps in a row had a non-finite loss or gradient ({steps}); "
                f"{len(self.skipped_steps)} skipped in this run. The model was not updated by "
                "them; its last checkpoint is intact. Lower optim.lr, use precision fp32 or bf16, "
                "or check the samples named above"
            )

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call)."""
        return self.state.save(self.parts)

    def fit(self) -> TrainResult:
        """Train to ``schedule``'s end (or ``max_steps``); write the final artefacts."""
        self.setup()
        finished = False
        try:
            with self._stop.installed():
                result = self._train()
            finished = True
            return result
        finally:
            self.close(wait_for_all=finished)

    def _train(self) -> TrainResult:
        parts, state, artefacts = self.parts, self.state, self.artefacts
        stop = parts.schedule.total_steps
        if self.max_steps is not None:
            stop = min(stop, self.max_steps)
        losses: list[float] = []
        run_start, run_samples = time.perf_counter(), 0
        batches = self._batches()
        artefacts.begin(state.step, stop, parts.schedule)
        skipped_in_a_row = 0
        stopped_by = None
        try:
            while state.step < stop:
                step_start = time.perf_counter()
                outcome = self._optimizer_step(batches)
                if outcome.fault is not None:
                    skipped_in_a_row += 1
                    self._skip(outcome, skipped_in_a_row)
                else:
                    skipped_in_a_row = 0
                    state.step += 1
                    metrics = outcome.metrics
                    losses.append(metrics["loss"])
                    run_samples += outcome.samples
                    elapsed = time.perf_counter() - step_start
                    artefacts.step_done(metrics, outcome.samples, elapsed)
                    if state.step % self.config.log_every == 0 or state.step == stop:
                        artefacts.log(state.step, parts.loader.stats)
                    if state.step % self.config.checkpoint_every == 0 and state.step < stop:
                        self.save_checkpoint()
                if outcome.stop:
                    stopped_by = self._stop.received or "a stop request on another rank"
                    break
        except KeyboardInterrupt:
            # One process: keep the progress (exact unless the interrupt came mid-step, when the
            # data stream is a few batches ahead). Under torchrun the launcher stops every rank
            # and a checkpoint would need all of them.
            if not parts.context.distributed and not state.saved:
                path = self.save_checkpoint()
                artefacts.say(f"interrupted at step {state.step}; checkpoint written to {path}")
            raise
        finally:
            artefacts.end()
            batches.close()
        if not state.saved:
            self.save_checkpoint()
        result = TrainResult(
            step=state.step,
            losses=losses,
            output_dir=self.output_dir,
            records=artefacts.records,
            checkpoint=state.last_checkpoint,
            resumed_from=state.resumed_from,
            data_stats=self._all_ranks_stats(),
            skipped_steps=list(self.skipped_steps),
            stopped_by=stopped_by,
        )
        if stopped_by is not None:
            artefacts.say(
                f"stopped by {stopped_by} at step {state.step}; checkpoint written to "
                f"{state.last_checkpoint}; run the same command again to resume"
            )
            return result
        return artefacts.finish(
            result,
            model=parts.objective.model,
            model_state=parts.strategy.full_model_state(parts.objective),
            total_steps=parts.schedule.total_steps,
            seconds=time.perf_counter() - run_start,
            samples=run_samples,
            freeze=parts.freeze_report,
        )

    def _all_ranks_stats(self) -> DataStats:
        context, stats = self.parts.context, self.parts.loader.stats
        if not context.distributed:
            return copy.deepcopy(stats)
        gathered: list[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, stats)
        total = DataStats()
        for rank_stats in gathered:
            total.merge(rank_stats)
        return total

    def close(self, *, wait_for_all: bool = True) -> None:
        """Close the metrics files and end a process group this trainer started.

        ``wait_for_all`` synchronises the ranks first (skipped after an error, when the other
        ranks may never arrive)."""
        self.artefacts.close()
        context = self._context
        if context is None or not dist.is_initialized():
            return
        # Every rank waits for rank 0's final writes, and the DDP wrapper (which holds the
        # process group) goes first: tearing the group down under it can hang at exit.
        if wait_for_all and context.distributed and self._parts is not None:
            dist.barrier()
        if self._parts is not None:
            self._parts.wrapped = self._parts.objective
        if context.started_process_group:
            dist.destroy_process_group()
            context.started_process_group = False


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
