"""Trainer checkpoint files: a directory of ``step_*.pt`` with a ``latest`` pointer and pruning,
and the data pipeline's bad-sample counts as plain values (checkpoints load ``weights_only``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peace_core.checkpoint import CheckpointError, write_checkpoint
from peace_core.data.stats import DatasetCounts, DataStats

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
