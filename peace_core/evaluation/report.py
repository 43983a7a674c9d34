"""Showing evaluation results: rich tables, PNG plots and metrics.json.

Tables and files are made from the JSON-ready dictionaries of the results (``to_dict()``), so the
same functions print a fresh evaluation and one read back from ``metrics.json``. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table

from peace_core.config import ANCHOR_MODALITY
from peace_core.evaluation.classification import LABEL_FIELDS
from peace_core.extras import TRAIN_EXTRA, available, require

if TYPE_CHECKING:
    from peace_core.evaluation.zero_shot import EvaluationResult, ModalityEmbeddings

#: Metric names of a training log that are losses (plotted by :func:`plot_loss_curves`).
LOSS_PREFIXES: tuple[str, ...] = ("loss", "align:", "dcl:")


def _pyplot():
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(value: float | None) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{100 * value:.1f}")
    )


# ------------------------------------------------------------------------------------ tables


def retrieval_table(retrieval: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per modality and direction: R@K in percent, chance in brackets."""
    ks = sorted({int(k[2:]) for r in retrieval.values() for k in r["item_to_text"]} or {1, 5, 10})
    table = Table(title="Zero-shot retrieval (recall %, chance in brackets)")
    table.add_column("pair")
    table.add_column("direction")
    table.add_column("queries", justify="right")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
    for modality, result in retrieval.items():
        for direction, label, queries in (
            ("item_to_text", f"{modality} → text", result["items"]),
            ("text_to_item", f"text → {modality}", result["texts"]),
        ):
            cells = [
                f"{_pct(result[direction].get(f'R@{k}'))} "
                f"[dim]({_pct(result['chance'][direction].get(f'R@{k}'))})[/dim]"
                for k in ks
            ]
            table.add_row(f"{modality}-text", label, str(queries), *cells)
    return table


def classification_table(classification: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per modality: accuracy and top-5 in percent, chance in brackets."""
    table = Table(title="Zero-shot classification (%, chance in brackets)")
    for name, justify in (
        ("task", "left"),
        ("classes", "right"),
        ("samples", "right"),
        ("accuracy", "right"),
        ("top-5", "right"),
        ("worst class", "left"),
    ):
        table.add_column(name, justify=justify)
    for task, result in classification.items():
        per_class = {k: v for k, v in result["per_class_accuracy"].items() if v is not None}
        worst = min(per_class, key=per_class.get) if per_class else None
        top5 = (
            "—"
            if result["top5"] is None
            else f"{_pct(result['top5'])} [dim]({_pct(result['chance_top5'])})[/dim]"
        )
        table.add_row(
            task,
            str(len(result["classes"])),
            str(result["samples"]),
            f"{_pct(result['accuracy'])} [dim]({_pct(result['chance'])})[/dim]",
            top5,
            f"{worst} {_pct(per_class[worst])}" if worst else "—",
        )
    return table


def print_metrics(metrics: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the tables of an evaluation's metrics dictionary and what was skipped."""
    console = console or Console()
    if metrics.get("retrieval"):
        console.print(retrieval_table(metrics["retrieval"]))
    if metrics.get("classification"):
        console.print(classification_table(metrics["classification"]))
    skipped = metrics.get("skipped") or {}
    if skipped.get("total"):
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped["by_reason"].items())
        console.print(f"[yellow]skipped {skipped['total']}[/yellow] ({reasons})")
    for note in metrics.get("notes") or []:
        console.print(f"[yellow]note:[/yellow] {note}")


# ------------------------------------------------------------------------------------ files


def write_metrics(metrics: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``metrics`` as indented JSON (NaN written as null), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    return value


# ------------------------------------------------------------------------------------ plots


def plot_confusion_matrix(
    confusion: torch.Tensor | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "confusion matrix",
) -> Path:
    """Row-normalised confusion matrix (rows: true class) with the counts written in."""
    counts = torch.as_tensor(confusion, dtype=torch.float64)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(
            f"confusion matrix is {tuple(counts.shape)} but there are {len(classes)} classes"
        )
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    plt = _pyplot()
    side = max(4.0, 0.55 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        for row in range(len(classes)):
            for col in range(len(classes)):
                colour = "white" if rates[row, col] > 0.5 else "black"
                ax.text(
                    col,
                    row,
                    int(counts[row, col]),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=8,
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, plt, path)


def plot_similarity_heatmap(
    item_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    item_labels: Sequence[str] | None = None,
    text_labels: Sequence[str] | None = None,
    title: str = "item-text cosine similarity",
) -> Path:
    """Cosine similarity of items (rows) and texts (columns); pairs on the diagonal when the
    i-th text belongs to the i-th item."""
    similarity = (item_embeddings.float() @ text_embeddings.float().T).numpy()
    plt = _pyplot()
    rows, cols = similarity.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * cols + 3), max(4.0, 0.3 * rows + 2)))
    image = ax.imshow(similarity, cmap="viridis", aspect="auto")
    if text_labels is not None:
        ax.set_xticks(
            range(cols),
            labels=[_short(t) for t in text_labels],
            rotation=60,
            ha="right",
            fontsize=6,
        )
    ax.set_xlabel(ANCHOR_MODALITY)
    if item_labels is not None:
        ax.set_yticks(range(rows), labels=[_short(t) for t in item_labels], fontsize=6)
    ax.set_ylabel("item")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, plt, path)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_metrics_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a training log (one JSON object per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics log {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number} is not JSON: {err}") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_loss(name: str) -> bool:
    leaf = name.rsplit("/", 1)[-1]
    return any(leaf == p or (p.endswith(":") and leaf.startswith(p)) for p in LOSS_PREFIXES)


def loss_series(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` for every loss metric of a training log; the step is the
    record's ``step`` field, else its position."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        step = record.get("step", index)
        for name, value in record.items():
            if not _is_loss(name) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(float(step))
            values.append(float(value))
    return series


def plot_loss_curves(
    logs: Mapping[str, str | os.PathLike[str]], path: str | os.PathLike[str]
) -> Path:
    """One panel per training log (e.g. ``{"stage 1": ".../metrics.jsonl"}``) with its loss
    terms: the raw values faint, an exponential moving average on top."""
    if not logs:
        raise ValueError("plot_loss_curves needs at least one metrics log")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(logs), figsize=(6.5 * len(logs), 4.2), squeeze=False)
    for ax, (label, log) in zip(axes[0], logs.items()):
        series = loss_series(read_metrics_jsonl(log))
        if not series:
            raise ValueError(f"metrics log {log} holds no loss metric ({', '.join(LOSS_PREFIXES)})")
        for name, (steps, values) in sorted(series.items()):
            (line,) = ax.plot(steps, _ema(values), label=name, linewidth=1.6)
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _ema(values: Sequence[float], smoothing: float = 0.8) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's) so that it does not lag at the
    start."""
    smoothed, current = [], 0.0
    for step, value in enumerate(values, start=1):
        current = smoothing * current + (1 - smoothing) * value
        smoothed.append(current / (1 - smoothing**step))
    return smoothed


def _save(fig: Any, plt: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ a whole run


def write_evaluation_report(
    result: EvaluationResult,
    out: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
    heatmap_items: int = 24,
) -> dict[str, Any]:
    """Write ``metrics.json`` (plus ``extra`` fields), one confusion matrix PNG per classified
    modality and one similarity heatmap per retrieval pair under ``out``; returns the metrics
    with the written files listed under ``"files"``. Without matplotlib (``peace-core[train]``)
    only ``metrics.json`` is written and ``"plots_skipped"`` says why."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {**(extra or {}), **result.to_dict()}
    files: dict[str, str] = {}
    if not available("matplotlib"):
        metrics["files"] = files
        metrics["plots_skipped"] = f"matplotlib is not installed: {TRAIN_EXTRA}"
        write_metrics(metrics, out / "metrics.json")
        return metrics
    for task, scored in result.classification.items():
        name = f"confusion_{task.replace(':', '_')}.png"
        plot_confusion_matrix(
            scored.confusion,
            scored.classes,
            out / name,
            title=f"{task}: zero-shot accuracy {100 * scored.accuracy:.1f}% "
            f"(chance {100 * scored.chance:.1f}%)",
        )
        files[f"confusion:{task}"] = name
    for modality, item in result.data.items():
        if item.caption_embeddings is None or not item.captions:
            continue
        rows, texts, columns = _first_captions(item, heatmap_items)
        name = f"similarity_{modality}.png"
        plot_similarity_heatmap(
            item.embeddings[rows],
            item.caption_embeddings[columns],
            out / name,
            item_labels=[_item_label(item, r) for r in rows],
            text_labels=texts,
            title=f"{modality}-text cosine similarity (each item's first caption on the diagonal)",
        )
        files[f"similarity:{modality}"] = name
    metrics["files"] = files
    write_metrics(metrics, out / "metrics.json")
    return metrics


def _item_label(item: ModalityEmbeddings, row: int) -> str:
    """The sample key, with its class when the json names one."""
    metadata = item.metadata[row]
    label = next((metadata[f] for f in LABEL_FIELDS if metadata.get(f) is not None), None)
    return item.keys[row] if label is None else f"{item.keys[row]} ({label})"


def _first_captions(item: ModalityEmbeddings, limit: int) -> tuple[list[int], list[str], list[int]]:
    """The first ``limit`` items that have a caption, their first captions and caption rows."""
    rows: list[int] = []
    columns: list[int] = []
    for column, owner in enumerate(item.caption_owner.tolist()):
        if owner not in rows:
            rows.append(owner)
            columns.append(column)
            if len(rows) == limit:
                break
    return rows, [item.captions[c] for c in columns], columns
