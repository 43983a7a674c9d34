"""Checkpoint files are read without running code stored in them."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from peace_core.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    write_checkpoint,
)


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_save_payload_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_payload_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_of_tensors_loads(tmp_path: Path) -> None:
    # The official vision-only file is a plain pickle ("Invalid magic number" for torch.load).
    state = OrderedDict(a=torch.randn(2, 3), b=torch.randn(4).to(torch.bfloat16))
    path = tmp_path / "vision.pth"
    path.write_bytes(pickle.dumps({"model": state, "matching_heuristics": True}))
    loaded = read_checkpoint(path)
    assert loaded["matching_heuristics"] is True
    assert torch.equal(loaded["model"]["a"], state["a"])
    assert loaded["model"]["b"].dtype == torch.bfloat16


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_native_round_trip(tmp_path: Path, suffix: str) -> None:
    state = {"x.weight": torch.randn(3, 3), "y": torch.arange(4)}
    config = {"name": "t", "encoder": {"dim": 8}}
    path = write_checkpoint(tmp_path / f"model{suffix}", config, state)
    loaded = read_checkpoint(path)
    assert loaded["config"] == config
    assert set(loaded["state_dict"]) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temp file behind"


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        read_checkpoint(garbage)


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))
