"""Counting good and bad samples, per dataset and per reason, across DataLoader workers.

Each worker process keeps its own :class:`DataStats` and ships what changed since its last batch
inside that batch (:meth:`DataStats.drain`); the main process merges those deltas into the
trainer's :class:`DataStats`. Counts therefore reach the main process in the same order as the
batches, with no shared memory and nothing lost when a worker ends (its last record carries the
remainder).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from peace_registry.errors import PeaceError

#: How many example messages are kept per (dataset, reason): enough to debug, small to ship.
_EXAMPLES_PER_REASON = 3


class TooManyBadSamplesError(PeaceError):
    """A dataset's share of bad samples passed ``max_bad_fraction``."""


@dataclass
class DatasetCounts:
    """Good and bad samples of one dataset; bad ones by reason, with a few examples each."""

    ok: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def seen(self) -> int:
        return self.ok + self.bad_total

    @property
    def bad_fraction(self) -> float:
        return self.bad_total / self.seen if self.seen else 0.0

    def top_reasons(self, count: int = 3) -> list[tuple[str, int]]:
        return sorted(self.bad.items(), key=lambda item: (-item[1], item[0]))[:count]

    def merge(self, other: DatasetCounts) -> None:
        self.ok += other.ok
        self.bad.update(other.bad)
        for reason, messages in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(messages[: _EXAMPLES_PER_REASON - len(kept)])


@dataclass
class DataStats:
    """Sample counts of every dataset. Picklable: workers send deltas of it to the main process."""

    datasets: dict[str, DatasetCounts] = field(default_factory=dict)

    def counts(self, dataset: str) -> DatasetCounts:
        return self.datasets.setdefault(dataset, DatasetCounts())

    def record_ok(self, dataset: str, count: int = 1) -> None:
        self.counts(dataset).ok += count

    def record_bad(self, dataset: str, reason: str, example: str = "") -> None:
        counts = self.counts(dataset)
        counts.bad[reason] += 1
        examples = counts.examples.setdefault(reason, [])
        if example and len(examples) < _EXAMPLES_PER_REASON:
            examples.append(example)

    def merge(self, other: DataStats) -> None:
        for name, counts in other.datasets.items():
            self.counts(name).merge(counts)

    def drain(self) -> DataStats:
        """What was counted since the last drain; this object starts again from zero."""
        delta = DataStats(self.datasets)
        self.datasets = {}
        return delta

    @property
    def empty(self) -> bool:
        return not any(c.seen for c in self.datasets.values())

    @property
    def ok_total(self) -> int:
        return sum(c.ok for c in self.datasets.values())

    @property
    def bad_total(self) -> int:
        return sum(c.bad_total for c in self.datasets.values())

    def check(self, max_bad_fraction: float, min_samples: int) -> None:
        """Raise :class:`TooManyBadSamplesError` when a dataset that has seen at least
        ``min_samples`` samples has a larger share of bad ones than ``max_bad_fraction``."""
        for name, counts in sorted(self.datasets.items()):
            if counts.seen >= min_samples and counts.bad_fraction > max_bad_fraction:
                raise TooManyBadSamplesError(
                    f"dataset {name!r}: {counts.bad_total} of {counts.seen} samples were bad "
                    f"({counts.bad_fraction:.1%}, the limit is {max_bad_fraction:.1%} after "
                    f"{min_samples} samples); top reasons: {_describe_reasons(counts)}"
                )

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for metrics logs: ``{dataset: {"ok": n, "bad": n, "reasons": {...}}}``."""
        return {
            name: {"ok": c.ok, "bad": c.bad_total, "reasons": dict(sorted(c.bad.items()))}
            for name, c in sorted(self.datasets.items())
        }

    def summary(self) -> str:
        """A few lines for the end of a run: every dataset's counts and its bad-sample reasons."""
        if not self.datasets:
            return "data: no samples read"
        lines = []
        for name, counts in sorted(self.datasets.items()):
            line = f"data {name}: {counts.ok} ok, {counts.bad_total} skipped"
            if counts.bad_total:
                line += f" ({counts.bad_fraction:.1%}): {_describe_reasons(counts, count=None)}"
            lines.append(line)
        return "\n".join(lines)


def _describe_reasons(counts: DatasetCounts, count: int | None = 3) -> str:
    reasons = counts.top_reasons(len(counts.bad) if count is None else count)
    parts = []
    for reason, number in reasons:
        examples = counts.examples.get(reason)
        parts.append(f"{reason} ×{number}" + (f" (e.g. {examples[0]})" if examples else ""))
    return "; ".join(parts)
