"""What the training tests share: a micro model, a micro run config, and runners for
``peace pretrain`` in a subprocess (one process, or 2 ranks under torchrun)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peace_core.data import SynthConfig, synthesize
from peace_core.pretrain.logging import read_metrics

MICRO_MODEL: dict[str, Any] = {
    "name": "micro",
    "encoder": {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64, "layer_scale_init": 0.1},
    "modalities": {
        "vision": {"image_size": 32},
        "text": {
            "vocab_size": 260,
            "tokenizer": {"kind": "bytes"},
            "max_positions": 66,
            "bucket_size": 16,
            "max_tokens": 32,
        },
        "audio": {
            "feature_layers": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2,
            "bucket_size": 32,
            "max_duration": 1.0,
            "conv_pos_depth": 2,
            "conv_pos_width": 16,
        },
    },
}
MICRO_DECODER = {"dim": 32, "heads": 2, "ffn_dim": 64, "depth": 1, "max_positions": 128}


def micro_dataset(root: Path) -> Path:
    """16 image-text and 16 audio-text training pairs in shards of 8, 32-px images."""
    config = SynthConfig(
        train_images=16,
        train_sounds=16,
        test_images=0,
        test_sounds=0,
        texts=0,
        image_size=32,
        shard_size=8,
    )
    synthesize(root, config, jobs=1)
    return root


def stage1_config(synth_root: Path, output: Path, **changes: Any) -> dict[str, Any]:
    """A vision+text micro run as a plain dict (tests edit it before validating)."""
    config: dict[str, Any] = {
        "model": {"config": copy.deepcopy(MICRO_MODEL), "modalities": ["vision", "text"]},
        "objective": {"decoder": dict(MICRO_DECODER)},
        "data": {
            "datasets": [
                {
                    "name": "images",
                    "urls": str(synth_root / "train" / "image_text-*.tar"),
                    "modalities": ["vision", "text"],
                }
            ],
            "batch_size": 4,
            "workers": 0,
            "shuffle_buffer": 6,
            "seed": 5,
        },
        "optim": {"lr": 2e-3},
        "schedule": {"total_steps": 6, "warmup_steps": 2},
        "output_dir": str(output),
        "log_every": 1,
        "checkpoint_every": 100,
        "tensorboard": False,
    }
    config.update(changes)
    return config


def start_torchrun(config_path: Path, *extra: str) -> subprocess.Popen[str]:
    """``peace pretrain`` on 2 CPU ranks under torchrun, in a session of its own (so that a hang
    can kill its workers too); output on one pipe."""
    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    command = [
        str(launcher if launcher.exists() else "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "peace_core.cli",
        "pretrain",
        str(config_path),
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


def wait(process: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    """The exit code and output of ``process``; a hang fails the test (its session killed)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run timed out: {output[-4000:]}")
    return process.returncode, output


def torchrun(config_path: Path, *extra: str) -> None:
    code, output = wait(start_torchrun(config_path, *extra))
    assert code == 0, output[-4000:]


def single_process(config_path: Path) -> str:

    command = [sys.executable, "-m", "peace_core.cli", "pretrain", str(config_path)]
    done = subprocess.run(
        [*command, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
