"""Pretraining a modality pair without text: the objective's pairs are configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from peace_core.config_io import load_config
from peace_core.data.synth import SynthConfig, synthesize
from peace_core.pretrain import pretrain
from peace_core.pretrain.config import PretrainConfig
from peace_core.pretrain.logging import read_metrics

MICRO_MODEL = {
    "name": "micro",
    "encoder": {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64},
    "modalities": {
        "vision": {"image_size": 32},
        "audio": {
            "feature_layers": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2,
            "bucket_size": 32,
            "max_duration": 1.0,
            "conv_pos_depth": 2,
            "conv_pos_width": 16,
        },
    },
}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("PEACE_THREADS", "1")  # what the trainer applies
    yield
    torch.set_num_threads(threads)


def test_audio_with_vision_pretrains_on_synthetic_pairs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(
        data,
        SynthConfig(
            train_images=0,
            train_sounds=0,
            test_images=0,
            test_sounds=0,
            texts=0,
            image_sounds=24,
            image_size=32,
            shard_size=12,
        ),
        jobs=1,
    )
    raw = {
        "model": {"config": MICRO_MODEL},
        "objective": {
            "anchor": None,
            "pairs": [["vision", "audio"]],
            "decoder": {"dim": 32, "heads": 2, "ffn_dim": 64, "depth": 1, "max_positions": 128},
        },
        "data": {
            "datasets": [
                {
                    "name": "pairs",
                    "urls": str(data / "train" / "image_audio-*.tar"),
                    "modalities": ["vision", "audio"],
                }
            ],
            "batch_size": 4,
            "workers": 0,
            "shuffle_buffer": 8,
        },
        "optim": {"lr": 1e-3},
        "schedule": {"total_steps": 4, "warmup_steps": 1},
        "output_dir": str(tmp_path / "run"),
        "log_every": 1,
        "checkpoint_every": 100,
        "tensorboard": False,
    }
    result = pretrain(load_config(PretrainConfig, base=raw), progress=False)
    assert result.step == 4
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 4
    for record in records:
        # No text anywhere: the pair is aligned, and each side and the joint view is denoised.
        assert all("text" not in key for key in record)
        for key in ("align:vision-audio", "dcl:vision", "dcl:audio", "dcl:joint:audio"):
            assert torch.isfinite(torch.tensor(record[key])), key
