"""What a pretraining run leaves for its user: messages, the progress bar, the metrics, and at
the end the model file, the plot and ``summary.json``.

The run directory gets ``config.yaml`` (the resolved config, at the start), ``metrics.jsonl``
and TensorBoard events (:mod:`peace_core.pretrain.logging`; one record every ``log_every``
steps: the mean of those steps, samples/s over every rank, the data pipeline's counts),
``model.safetensors``, ``metrics.png`` and ``summary.json`` (at the end, also returned as
:class:`TrainResult`). Each record goes through the collapse guard, whose warnings are printed
and kept in the summary. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peace_core.checkpoint import write_checkpoint
from peace_core.config_io import save_config
from peace_core.data.stats import DataStats
from peace_core.model import PeaceModel
from peace_core.pretrain.collapse import CollapseGuard, patience_for
from peace_core.pretrain.config import PretrainConfig
from peace_core.pretrain.freeze import FreezeReport
from peace_core.pretrain.logging import (
    METRICS_FILE,
    PLOT_FILE,
    MetricsLogger,
    mean_metrics,
    plot_metrics,
    read_metrics,
)
from peace_core.pretrain.optim import ResolvedSchedule
from peace_core.pretrain.runtime import RunContext

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"


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
    #: Steps whose update was dropped for a non-finite loss or gradient.
    skipped_steps: list[dict[str, Any]] = field(default_factory=list)
    #: The signal that ended the run early (it wrote a checkpoint; run again to resume).
    stopped_by: str | None = None

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


def data_metrics(stats: DataStats) -> dict[str, float]:
    """The data pipeline's counts as metrics: good and skipped samples, skipped per dataset."""
    metrics = {"data_ok": float(stats.ok_total), "data_bad": float(stats.bad_total)}
    for name, counts in stats.datasets.items():
        metrics[f"data_bad:{name}"] = float(counts.bad_total)
    return metrics


class RunArtefacts:
    """The files and messages of the run ``config`` describes, on every rank (silent on all but
    rank 0).

    Until :meth:`attach` gives the rank, messages are printed. ``progress`` shows a progress
    bar (default: on). ``echo`` receives the messages instead of the terminal.
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        progress: bool | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.progress = progress
        self._echo = echo
        self._context: RunContext | None = None
        self._logger: MetricsLogger | None = None
        #: The logged records (rank 0).
        self.records: list[dict[str, Any]] = []
        #: Collapse warnings printed during this run (also in summary.json).
        self.collapse_warnings: list[str] = []
        # Set by begin() for a stretch of training.
        self._guard: CollapseGuard | None = None
        self._bar: Any = None
        self._window: list[dict[str, float]] = []
        self._window_samples = 0
        self._window_start = 0.0

    @property
    def is_main(self) -> bool:
        return self._context is None or self._context.is_main

    @property
    def world_size(self) -> int:
        return 1 if self._context is None else self._context.world_size

    def attach(self, context: RunContext) -> None:
        """Learn this process's place in the run: from now on only rank 0 prints and writes."""
        self._context = context

    def open(self, *, resumed_at: int | None) -> None:
        """Save the resolved config and open the metrics files (rank 0). A run resumed at step
        ``resumed_at`` drops the records of later steps; a fresh run (None) starts over."""
        if self.is_main:
            save_config(self.config, self.output_dir / CONFIG_FILE)
            self._logger = MetricsLogger(
                self.output_dir, tensorboard=self.config.tensorboard, resume_step=resumed_at
            )

    def say(self, message: str) -> None:
        """Tell the user (rank 0): through ``echo``, else above the progress bar."""
        if not self.is_main:
            return
        if self._echo is not None:
            self._echo(message)
            return
        from tqdm.auto import tqdm

        for line in message.splitlines():
            tqdm.write(line)

    # ------------------------------------------------------------------------ during training

    def begin(self, step: int, stop: int, schedule: ResolvedSchedule) -> None:
        """Training goes from ``step`` to ``stop``: start the progress bar, the collapse guard
        and the first window of steps."""
        self._guard = CollapseGuard(
            warmup_steps=schedule.warmup_steps,
            patience_steps=patience_for(schedule.total_steps, self.config.log_every),
        )
        self._bar = self._progress_bar(step, stop)
        self._window, self._window_samples, self._window_start = [], 0, time.perf_counter()

    def _progress_bar(self, step: int, stop: int) -> Any:
        show = self.progress if self.progress is not None else True
        if not (show and self.is_main) or step >= stop:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    def step_done(self, metrics: dict[str, float], samples: int, seconds: float) -> None:
        """One optimizer step took ``seconds`` for this rank's ``samples``: add it to the
        window and move the progress bar."""
        self._window.append(metrics)
        self._window_samples += samples
        if self._bar is not None:
            rate = samples * self.world_size / seconds
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.1f}")

    def log(self, step: int, stats: DataStats) -> None:
        """Log the window's mean with the data counts at ``step``, check it for collapse, and
        start a new window."""
        elapsed = time.perf_counter() - self._window_start
        record = mean_metrics(self._window)
        record["samples_per_s"] = self._window_samples * self.world_size / max(elapsed, 1e-9)
        record.update(data_metrics(stats))
        if self._logger is not None:
            self.records.append(self._logger.log(step, record))
        if self._guard is not None:
            for warning in self._guard.check(step, record):
                self.collapse_warnings.append(warning)
                self.say(warning)
        self._window, self._window_samples, self._window_start = [], 0, time.perf_counter()

    def end(self) -> None:
        """Training stopped (at its end or not): close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------ at the end

    def finish(
        self,
        result: TrainResult,
        *,
        model: PeaceModel,
        model_state: Mapping[str, torch.Tensor],
        total_steps: int,
        seconds: float,
        samples: int,
        freeze: FreezeReport,
    ) -> TrainResult:
        """Rank 0: write the model, the plot and ``summary.json`` into ``result`` and say what
        the run did. ``model_state`` is the model's full weights (gathered from the shards of an
        FSDP run). ``samples`` is this rank's count over ``seconds``."""
        if not self.is_main:
            return result
        model_path = write_checkpoint(
            self.output_dir / MODEL_FILE, model.config.model_dump(mode="json"), dict(model_state)
        )
        history = read_metrics(self.output_dir / METRICS_FILE)
        plot = plot_metrics(history, self.output_dir / PLOT_FILE, title=str(model.config.name))
        tail = result.losses[-max(1, self.config.log_every) :]
        result.model_path, result.plot_path = model_path, plot
        result.summary = {
            "step": result.step,
            "total_steps": total_steps,
            "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "seconds": round(seconds, 3),
            "samples": samples * self.world_size,
            "trainable_parameters": freeze.trainable_count,
            "frozen_parameters": freeze.frozen_count,
            "data": result.data_stats.as_dict(),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "model": str(model_path),
            "plot": str(plot) if plot else None,
            "collapse_warnings": list(self.collapse_warnings),
            "skipped_steps": [
                {"step": s["step"], "fault": s["fault"], "keys": s["keys"][:32]}
                for s in result.skipped_steps
            ],
        }
        save_config(result.summary, self.output_dir / SUMMARY_FILE)
        self.say(result.describe())
        return result

    def close(self) -> None:
        """Close the progress bar and the metrics files."""
        self.end()
        if self._logger is not None:
            self._logger.close()
            self._logger = None
