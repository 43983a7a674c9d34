"""benchmarks/workloads.py: one workload end to end at the tiny size, and the comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # Children run as the commands do: host memory kept for reuse (on glibc).
    kept_or_not_glibc = {"freed memory kept for reuse", "system default (not glibc)"}
    assert {r["host_malloc"] for r in rows} <= kept_or_not_glibc
    # ... and with the fp32 GEMM library the commands would pick.
    from peace_core.gemm import resolve_cpu_gemm

    assert {r["cpu_gemm"] for r in rows} == {resolve_cpu_gemm("auto")[0]}


@pytest.mark.parametrize("compare", ["libraries", "layouts"])
def test_gemm_benchmark_reports_every_direction_of_each_shape(compare: str) -> None:
    from peace_core.gemm import onednn_available

    if not onednn_available():
        pytest.skip("torch built without oneDNN")
    gemm_script = SCRIPT.with_name("gemm.py")
    done = subprocess.run(
        [
            sys.executable,
            str(gemm_script),
            "--threads=1",
            "--rounds=1",
            "--repeats=1",
            "--shapes=16x8x4,9x4x12",
            f"--compare={compare}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], " ".join(r[1:-3])) for r in rows] == [
        (shape, direction)
        for shape in ("16x8x4", "9x4x12")
        for direction in ("forward", "input grad", "weight grad")
    ]
    assert all(float(r[-3]) > 0 and float(r[-2]) > 0 for r in rows)


def test_comparison_gives_speed_and_memory_ratios(tmp_path: Path) -> None:
    def write(name: str, seconds: float, memory: float) -> Path:
        path = tmp_path / name
        row = {"size": "small", "workload": "text_forward", "median_s": seconds}
        path.write_text(json.dumps({**row, "peak_mem_mb": memory}) + "\n")
        return path

    table = run("--compare", str(write("base.jsonl", 3.0, 200)), str(write("ours.jsonl", 2.0, 50)))
    assert "| small | text_forward | 3.000 | 2.000 | 1.50× | 200 | 50 | 0.25 |" in table


def test_memory_plan_counts_the_sharded_state(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = SCRIPT.with_name("memory_plan.py")
    spec = importlib.util.spec_from_file_location("memory_plan", path)
    assert spec is not None and spec.loader is not None
    memory_plan = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "memory_plan", memory_plan)  # its dataclass looks itself up
    spec.loader.exec_module(memory_plan)

    sizes = memory_plan.sizes("tiny")
    assert sizes.total > sizes.kept_gathered > 0 and sizes.largest_block > 0
    gib = memory_plan.GIB
    one = memory_plan.plan(memory_plan.Sizes(total=gib, largest_block=0, kept_gathered=0), 4)
    assert one["ddp"] == (18.0, 0.0)  # 16 B of fp32 state + 2 B of bf16 copies per parameter
    assert one["fsdp x4"] == (4.0, 0.0)  # the 16 B shared by 4 ranks
    assert one["fsdp x4 + cpu_offload"] == (0.0, 4.0)
    table = subprocess.run(
        [sys.executable, str(path), "--presets=tiny", "--ranks=2"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "| `tiny` |" in table and "fsdp x2 + cpu_offload" in table


@pytest.mark.slow
def test_strategy_memory_counts_half_the_state_per_rank_under_fsdp() -> None:
    launcher = Path(sys.executable).with_name("torchrun")
    script = SCRIPT.with_name("strategy_memory.py")
    held = {}
    launch = [str(launcher), "--standalone", "--nproc-per-node", "2", str(script)]
    for strategy in ("ddp", "fsdp"):
        done = subprocess.run(
            [*launch, "--preset=tiny", f"--strategy={strategy}", "--steps=1", "--batch-size=2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"tiny, {strategy} x2"))
        held[strategy] = float(line.split("weights + AdamW ")[1].split(" MiB")[0])
    # Rounded to whole MiB: half, give or take the padding of uneven shards.
    assert held["fsdp"] == pytest.approx(held["ddp"] / 2, abs=1.0)
