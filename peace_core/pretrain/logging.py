"""Training metrics: ``metrics.jsonl`` (one JSON object per record), TensorBoard, a PNG plot.

A record is ``{"step": N, "time": unix seconds, name: number, ...}``, usually the mean over the
steps since the last one (:func:`mean_metrics`). Metric names follow the objective's (``loss``,
``align:text-vision``, ``dcl:joint:text``...); TensorBoard tags put a ``/`` for the first ``:``
so related curves group together. A resumed run first drops the records of steps after the
checkpoint it resumes from, so the file never holds two histories.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peace_core.extras import available, require

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def mean_metrics(steps: Iterable[Mapping[str, float]]) -> dict[str, float]:
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


class MetricsLogger:
    """Appends records to ``output_dir/metrics.jsonl`` and, optionally, TensorBoard events.

    ``resume_step`` (when continuing a run) truncates later records and tells TensorBoard to
    purge its events after that step.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh history
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            require("tensorboard", "TensorBoard logging (tensorboard = false turns it off)")
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Write one record; non-finite values are kept as JSON ``null``."""
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            number = float(value)
            record[name] = number if math.isfinite(number) else None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in metrics.items():
                number = float(value)
                if math.isfinite(number):
                    self._writer.add_scalar(tensorboard_tag(name), number, global_step=int(step))
        return record

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensorboard_tag(name: str) -> str:
    """``dcl:joint:text`` -> ``dcl/joint:text``; ``loss`` stays ``loss``."""
    return name.replace(":", "/", 1)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # an interrupted write; the rest is intact
    return records


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> None:
    """Keep only the records of steps up to ``last_step`` (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(temporary, path)


def _series(records: Iterable[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def plot_metrics(
    records: list[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = ""
) -> Path | None:
    """A PNG of the training curves: total loss, each loss term (the aligning losses with their
    chance level ln(candidates) dashed), alignment accuracy and embedding spread (the collapse
    guard's view: spread 1 = random unit vectors, 0 = every embedding the same), and the
    learning rate.

    Returns the path, or None when there is nothing to plot or matplotlib is not installed
    (``peace-core[train]``).
    """
    if not any("loss" in record for record in records) or not available("matplotlib"):
        return None
    # A bare Figure renders through Agg without pyplot: no display, no global backend change.
    from matplotlib.figure import Figure

    names = sorted({key for record in records for key in record})
    terms = [n for n in names if n.startswith(("align:", "dcl:"))]
    health = [n for n in names if n.startswith(("align_acc:", "spread:"))]
    figure = Figure(figsize=(16, 4), layout="constrained")
    total_ax, terms_ax, health_ax, lr_ax = figure.subplots(1, 4)
    total_ax.plot(*_series(records, "loss"), color="black")
    total_ax.set_title("total loss")
    for name in terms:
        (line,) = terms_ax.plot(*_series(records, name), label=name)
        chance_steps, chance = _series(records, "align_chance:" + name.split(":", 1)[1])
        if name.startswith("align:") and chance:
            terms_ax.plot(chance_steps, chance, linestyle="--", color=line.get_color(), alpha=0.6)
    terms_ax.set_title("loss terms (dashed: aligning loss at chance)")
    if terms:
        terms_ax.legend(fontsize="small")
    for name in health:
        health_ax.plot(*_series(records, name), label=name)
    health_ax.set_title("alignment accuracy and embedding spread")
    health_ax.set_ylim(0.0, 1.05)
    if health:
        health_ax.legend(fontsize="small")
    lr_ax.plot(*_series(records, "lr"), color="tab:green")
    lr_ax.set_title("learning rate")
    for axis in (total_ax, terms_ax, health_ax, lr_ax):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
