"""benchmarks/attention.py: both modes run end to end at tiny sizes and print a row per backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
TINY = ["--device=cpu", "--dim=32", "--heads=4", "--ffn-dim=64", "--tokens=9", "--batch=2"]


def rows(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--steps=1", "--warmup=0", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("-" * 40 + "\n", 1)[1]
    return {line.split()[0]: float(line.split()[1]) for line in table.splitlines() if line}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [([], {"math", "sdpa"}), (["--attention-only"], {"math", "sdpa", "torch-sdpa"})],
)
def test_each_mode_times_every_runnable_backend(mode: list[str], expected: set[str]) -> None:
    timed = rows(*mode)
    assert set(timed) == expected  # xformers needs CUDA: skipped with a reason, not a row
    assert all(ms > 0 for ms in timed.values())
