"""The third-party path end to end: ``examples/peace-imu`` built as a wheel and pip-installed into a
temporary location is found by its entry point, passes ``peace plugins check``, writes its synthetic
data through ``peace data synth --kind imu``, and is trained onto a finished model with
everything that model had frozen: its vision, audio and text embeddings stay bit-identical. Gone
again when not installed. Reduced sizes: the figures of the full recipe are in the example's
README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "peace-imu"
PEACE = [sys.executable, "-m", "peace_core.cli"]

pytestmark = pytest.mark.slow

#: Fixed inputs whose embeddings must not move, and a comparison of two checkpoints on them.
COMPARE = """
import sys, torch
from peace_core import from_pretrained
before, after = (from_pretrained(p) for p in sys.argv[1:3])
assert "imu" in after.modalities and "imu" not in before.modalities, after.modalities
g = torch.Generator().manual_seed(0)
inputs = {
    "vision": {"pixels": torch.randn(3, 3, 64, 64, generator=g)},
    "audio": {
        "waveform": torch.randn(3, 8000, generator=g),
        "lengths": torch.tensor([8000, 6000, 4000]),
    },
    "text": before.preprocess(text=["a red circle", "a high beep", "someone running"])["text"],
}
with torch.no_grad():
    for name, batch in inputs.items():
        a = before({name: batch})[name]
        b = after({name: batch})[name]
        assert torch.equal(a.embedding, b.embedding) and torch.equal(a.hidden, b.hidden), name
    windows = after.preprocessor("imu").examples(2, seed=0)
    imu = after.encode(imu=windows)["imu"]
    assert imu.shape == (2, after.config.encoder.dim) and torch.isfinite(imu).all()
print("identical:", ", ".join(inputs))
"""


def _run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}"
    )
    return result.stdout


def _plugin_names(env: dict[str, str], cwd: Path) -> set[str]:
    listing = json.loads(_run([*PEACE, "plugins", "list", "--json"], env, cwd))
    return {plugin["name"] for plugin in listing["plugins"]}


def test_imu_plugin_installs_and_extends_a_finished_model(tmp_path: Path) -> None:
    import torch

    from peace_core import create_model, save_pretrained

    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheels)],
        dict(os.environ),
        EXAMPLE,
    )
    [wheel] = wheels.glob("peace_imu-*.whl")
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
         str(site), str(wheel)],
        dict(os.environ),
        tmp_path,
    )  # fmt: skip
    bare = {**os.environ, "PEACE_STRICT_PLUGINS": "1"}
    bare.pop("PYTHONPATH", None)
    installed = {**bare, "PYTHONPATH": str(site)}

    # Found by its entry point, checked like any plugin; absent when not installed.
    assert "imu" in _plugin_names(installed, work)
    assert "imu" not in _plugin_names(bare, work)
    checked = _run([*PEACE, "plugins", "check", "imu"], installed, work)
    assert "modality imu: 12/12 checks passed" in checked and "OK   dataset imu" in checked

    # Its synthetic data, through the core's CLI.
    sizes = [
        "train_windows=48", "test_windows=24", "train_subjects=4", "test_subjects=2",
        "min_seconds=2", "max_seconds=4", "shard_size=24",
    ]  # fmt: skip
    synth = [*PEACE, "data", "synth", "data/imu", "--kind", "imu"]
    for setting in sizes:
        synth += ["--set", setting]
    assert "train/imu_text" in _run(synth, installed, work)

    # A finished model without IMU, then the example's extend recipe at reduced size.
    torch.manual_seed(0)
    finished = save_pretrained(
        create_model("tiny", ["vision", "audio", "text"]), work / "finished.safetensors"
    )
    _run(
        [*PEACE, "pretrain", str(EXAMPLE / "configs" / "extend_tiny.toml"),
         "--set", f"model.init_from={finished}", "--set", "output_dir=run",
         "--set", "schedule.total_steps=3", "--set", "data.batch_size=8",
         "--set", "data.workers=0", "--set", "log_every=1", "--no-progress"],
        installed,
        work,
    )  # fmt: skip
    extended = work / "run" / "model.safetensors"
    out = _run([sys.executable, "-c", COMPARE, str(finished), str(extended)], installed, work)
    assert "identical: vision, audio, text" in out

    # Zero-shot evaluation of the new modality on held-out subjects.
    _run(
        [*PEACE, "eval", str(extended), "data/imu/test/imu_text-000000.tar",
         "--prompts", "imu=data/imu/prompts/imu.json", "--out", "eval", "--quiet"],
        installed,
        work,
    )  # fmt: skip
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["classification"]["imu"]["samples"] == 24
    assert metrics["retrieval"]["imu"]["items"] == 24
