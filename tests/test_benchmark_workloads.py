"""benchmarks/workloads.py: one workload end to end at the tiny size, and the comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "workloads.py"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_training_step_is_timed_counted_and_written(tmp_path: Path) -> None:
    out = tmp_path / "tiny.jsonl"
    table = run(
        "--sizes=tiny",
        "--workloads=text_forward,image_text_step",
        "--batch=2",
        "--warmup=0",
        "--repeats=1",
        "--threads=1",
        f"--json={out}",
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["size"], r["workload"]) for r in rows] == [
        ("tiny", "text_forward"),
        ("tiny", "image_text_step"),
    ]
    forward, step = rows
    assert all(r["median_s"] > 0 and r["params"] > 0 and r["batch"] == 2 for r in rows)
    # A step holds a forward's matmuls several times over, and their backward.
    assert step["flops"] > 3 * forward["flops"] > 0
    assert "| tiny | image_text_step |" in table and "MFU" in table


def test_comparison_gives_speed_and_memory_ratios(tmp_path: Path) -> None:
    def write(name: str, seconds: float, memory: float) -> Path:
        path = tmp_path / name
        row = {"size": "small", "workload": "text_forward", "median_s": seconds}
        path.write_text(json.dumps({**row, "peak_mem_mb": memory}) + "\n")
        return path

    table = run("--compare", str(write("base.jsonl", 3.0, 200)), str(write("ours.jsonl", 2.0, 50)))
    assert "| small | text_forward | 3.000 | 2.000 | 1.50× | 200 | 50 | 0.25 |" in table
