"""Thread planning: compute threads and data workers never exceed the CPUs a process may use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peace_core.cli import main as peace_main
from peace_core.threads import (
    THREADS_ENV_VAR,
    _cgroup_quota,
    apply_threads,
    available_cpus,
    plan_threads,
)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize(
    ("cpus", "ranks", "workers", "expected"),
    [
        (2, 1, 0, (2, 0)),  # nothing else runs: every CPU computes
        (2, 1, 1, (1, 1)),
        (2, 1, 4, (1, 1)),  # never more workers than CPUs less one
        (16, 1, 4, (12, 4)),
        (16, 4, 2, (2, 2)),  # four ranks share the host
        (16, 8, 2, (1, 1)),
        (1, 1, 2, (1, 0)),  # one CPU: no workers, one thread
    ],
)
def test_compute_and_workers_share_the_cpus(
    cpus: int, ranks: int, workers: int, expected: tuple[int, int]
) -> None:
    plan = plan_threads(data_workers=workers, cpus=cpus, local_ranks=ranks)
    assert (plan.intra_op, plan.data_workers) == expected
    assert plan.intra_op + plan.data_workers <= max(1, cpus // ranks) or plan.intra_op == 1


def test_torchrun_local_world_size_divides_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert plan_threads(cpus=16).intra_op == 4


def test_an_explicit_count_wins_and_keeps_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_threads(data_workers=3, threads=5, cpus=2)
    assert (plan.intra_op, plan.data_workers, plan.source) == (5, 3, "as asked")
    monkeypatch.setenv(THREADS_ENV_VAR, "3")
    from_env = plan_threads(data_workers=1, cpus=8)
    assert (from_env.intra_op, from_env.data_workers) == (3, 1)
    assert THREADS_ENV_VAR in from_env.source and THREADS_ENV_VAR in from_env.describe()
    assert plan_threads(threads=2, cpus=8).intra_op == 2  # the argument beats the variable


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(THREADS_ENV_VAR, bad)
    with pytest.raises(ValueError, match=THREADS_ENV_VAR):
        plan_threads()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        plan_threads(threads=0)
    with pytest.raises(ValueError, match="data_workers"):
        plan_threads(data_workers=-1)


def test_cgroup_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_quota(quota) == 2
    quota.write_text("max 100000\n")
    assert _cgroup_quota(quota) is None
    assert _cgroup_quota(tmp_path / "absent") is None
    assert 1 <= available_cpus() <= (torch.get_num_threads() + 64)


def test_apply_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        apply_threads(plan_threads(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["pretrain", "eval", "embed", "demo"])
def test_every_computing_command_takes_threads(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {
        "pretrain": ["pretrain", "configs/stage1_tiny.toml"],
        "eval": ["eval", "model.safetensors", "x.tar"],
        "embed": ["embed", "model.safetensors", "--text", "a", "--out", "o"],
        "demo": ["demo"],
    }[command]
    assert peace_main([*args, "--threads", "0"]) == 1
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
