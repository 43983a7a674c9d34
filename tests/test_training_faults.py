"""Faults during training: non-finite steps, signals, SIGKILL at random points, damaged
checkpoints and a full disk. Every one must leave a run that resumes from an intact checkpoint."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from training_helpers import losses, micro_dataset, stage1_config, start_torchrun, wait

from peace_core.checkpoint import CheckpointError, read_checkpoint
from peace_core.config_io import load_config
from peace_core.pretrain.config import PretrainConfig
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.run_state import verify_checkpoint
from peace_core.pretrain.trainer import Trainer, TrainingError


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("PEACE_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return micro_dataset(tmp_path_factory.mktemp("synth"))


def config(synth_root: Path, output: Path, **changes: Any) -> PretrainConfig:
    return load_config(PretrainConfig, base=stage1_config(synth_root, output, **changes))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.objective.model.state_dict().items()}


# ---- non-finite steps ------------------------------------------------------------------------


def _poison_calls_from(monkeypatch: pytest.MonkeyPatch, first_bad_call: int) -> None:
    """Every objective call from ``first_bad_call`` on returns a NaN loss (with a graph)."""
    forward = PretrainObjective.forward
    calls = {"n": 0}

    def poisoned(self: PretrainObjective, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        loss, metrics = forward(self, *args, **kwargs)
        if calls["n"] >= first_bad_call:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(PretrainObjective, "forward", poisoned)


def test_non_finite_losses_are_skipped_then_stop_the_run(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = Trainer(config(synth_root, tmp_path / "clean"), max_steps=2, progress=False)
    clean.fit()

    said: list[str] = []
    _poison_calls_from(monkeypatch, first_bad_call=3)
    run = config(synth_root, tmp_path / "nan", max_skipped_steps=3)
    trainer = Trainer(run, progress=False, echo=said.append)
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss") as caught:
        trainer.fit()
    assert "3 (loss), 3 (loss), 3 (loss)" in str(caught.value)
    # The skipped steps changed nothing: the weights are those of two clean steps.
    assert trainer.step == 2
    for key, value in weights(clean).items():
        assert torch.equal(weights(trainer)[key], value), key
    skipped = [line for line in said if line.startswith("warning: skipped the update of step 3")]
    assert len(skipped) == 3 and all("non-finite loss" in line for line in skipped)
    # The samples of each dropped batch are named.
    assert all(len(s["keys"]) == 4 and s["keys"][0] for s in trainer.skipped_steps)
    assert trainer.skipped_steps[0]["keys"] != trainer.skipped_steps[1]["keys"]


def test_one_non_finite_gradient_is_skipped_and_the_run_goes_on(
    synth_root: Path, tmp_path: Path
) -> None:
    run = config(synth_root, tmp_path / "run", schedule={"total_steps": 4, "warmup_steps": 1})
    trainer = Trainer(run, progress=False)
    trainer.setup()
    seen = {"backwards": 0}

    def first_gradient_is_nan(grad: torch.Tensor) -> torch.Tensor:
        seen["backwards"] += 1
        return grad * float("nan") if seen["backwards"] == 1 else grad

    trainer.objective.model.logit_scale.register_hook(first_gradient_is_nan)
    result = trainer.fit()
    assert result.step == 4 and len(result.losses) == 4
    assert [(s["step"], s["fault"]) for s in result.skipped_steps] == [(1, "gradient")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"][0]["fault"] == "gradient"
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())


# ---- damaged checkpoints and a full disk -----------------------------------------------------


def _two_checkpoints(synth_root: Path, output: Path) -> PretrainConfig:
    run = config(
        synth_root, output, schedule={"total_steps": 4, "warmup_steps": 1}, checkpoint_every=2
    )
    Trainer(run, progress=False).fit()
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_checkpoint_is_refused_and_resume_falls_back(
    synth_root: Path, tmp_path: Path, damage: str
) -> None:
    run = _two_checkpoints(synth_root, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = checkpoints / "step_00000004.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    assert "is corrupt" in (verify_checkpoint(newest) or "")
    with pytest.raises(CheckpointError, match=r"cannot resume: .* is corrupt"):
        Trainer(run, resume=newest, progress=False).setup()
    said: list[str] = []
    longer = run.model_copy(update={"schedule": run.schedule.model_copy(update={"total_steps": 6})})
    trainer = Trainer(longer, progress=False, echo=said.append)
    trainer.setup()
    assert trainer.resumed_from == checkpoints / "step_00000002.pt" and trainer.step == 2
    assert any(
        "step_00000004.pt" in line and "trying the checkpoint before" in line for line in said
    )
    trainer.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(
    synth_root: Path, tmp_path: Path
) -> None:
    run = _two_checkpoints(synth_root, tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(run, progress=False).setup()


def test_a_full_disk_while_writing_leaves_the_previous_checkpoint_intact(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _two_checkpoints(synth_root, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}

    def disk_full(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = Trainer(run, progress=False)
    trainer.setup()
    trainer.state.step = 5
    monkeypatch.setattr("peace_core.checkpoint.torch.save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    trainer.close()
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    assert verify_checkpoint(checkpoints / "step_00000004.pt") is None
    assert read_checkpoint(checkpoints / "step_00000004.pt")["step"] == 4


# ---- processes stopped from outside ----------------------------------------------------------


def _start(config_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "peace_core.cli", "pretrain", str(config_path), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PEACE_THREADS": "1"},
    )


def _wait_for_steps(process: subprocess.Popen[str], metrics: Path, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= at_least:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()[0][-3000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("the run made no progress in 120 s")


def _write_config(tmp_path: Path, synth_root: Path, name: str, **changes: Any) -> Path:
    raw = stage1_config(
        synth_root,
        tmp_path / name,
        schedule={"total_steps": 24, "warmup_steps": 2},
        **changes,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _finish(config_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "peace_core.cli", "pretrain", str(config_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PEACE_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _assert_same_run(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference)
    final = read_checkpoint(run / "model.safetensors")["state_dict"]
    for key, value in read_checkpoint(reference / "model.safetensors")["state_dict"].items():
        assert torch.equal(final[key], value), key


@pytest.fixture(scope="module")
def uninterrupted(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    _finish(_write_config(root, synth_root, "reference"))
    return root / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_cleanly(
    synth_root: Path, tmp_path: Path, uninterrupted: Path, sent: signal.Signals
) -> None:
    path = _write_config(tmp_path, synth_root, "run", checkpoint_every=1000)
    process = _start(path)
    _wait_for_steps(process, tmp_path / "run" / "metrics.jsonl", at_least=3)
    process.send_signal(sent)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + sent, output[-3000:]
    assert f"stopped by {sent.name} at step" in output and "Traceback" not in output
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1 and verify_checkpoint(saved[0]) is None
    assert not (tmp_path / "run" / "model.safetensors").exists()  # the run is not finished
    _finish(path)
    _assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes_exactly(
    synth_root: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    path = _write_config(tmp_path, synth_root, "run", checkpoint_every=1)
    metrics, checkpoints = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "checkpoints"
    chance = random.Random(20261205)
    kills = 0
    while kills < 5:
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        process = _start(path)
        _wait_for_steps(process, metrics, at_least=done + 2)
        time.sleep(chance.uniform(0.0, 0.25))  # mid-step, mid-write or between the two
        process.kill()
        process.communicate()
        kills += 1
        # What the kill left is always resumable: the newest checkpoint is intact.
        saved = sorted(checkpoints.glob("step_*.pt"))
        assert saved and verify_checkpoint(saved[-1]) is None
    output = _finish(path)
    assert "resumed from" in output
    _assert_same_run(tmp_path / "run", uninterrupted)
    assert not list(checkpoints.glob(".*.tmp"))  # debris of killed writes is cleared


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint(
    synth_root: Path, tmp_path: Path
) -> None:
    path = _write_config(tmp_path, synth_root, "run", checkpoint_every=1000)
    process = start_torchrun(path)
    _wait_for_steps(process, tmp_path / "run" / "metrics.jsonl", at_least=3)
    process.send_signal(signal.SIGTERM)
    code, output = wait(process, timeout=120)
    assert code != 0 and "stopped by SIGTERM at step" in output, output[-3000:]
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1 and verify_checkpoint(saved[0]) is None
    checkpoint = read_checkpoint(saved[0])
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    code, output = wait(start_torchrun(path))
    assert code == 0 and "resumed from" in output, output[-3000:]
    assert len(losses(tmp_path / "run")) == 24
