"""Where and how a training process runs: device, precision, the distributed process group, and
the global RNG states (seeding, capture and restore for exact resume, an isolated set for the
data stream)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Devices, precision, processes


@dataclass
class RunContext:
    """Where this process runs: its device and its place in a distributed run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    started_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def start_run(device_setting: str, *, always_group: bool = False) -> RunContext:
    """Pick the device and, under torchrun (``WORLD_SIZE > 1``), start the process group.

    ``always_group`` starts a group of one in a plain process too (FSDP needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    started = False
    if (world > 1 or always_group) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:  # no launcher: an in-process store, nothing listens on the network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        started = True
    if dist.is_available() and dist.is_initialized():
        return RunContext(device, dist.get_rank(), dist.get_world_size(), started)
    return RunContext(device)


@dataclass(frozen=True)
class Precision:
    """Resolved precision: autocast dtype (None: fp32) and whether a GradScaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        return self.autocast_dtype == torch.float16


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, fp32 otherwise."""
    cuda = device.type == "cuda"
    if setting == "auto":
        setting = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if setting == "fp32":
        return Precision("fp32", None)
    if setting == "fp16":
        if not cuda:
            raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
        return Precision("fp16", torch.float16)
    if setting == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use precision 'fp16' or 'fp32'")
        return Precision("bf16", torch.bfloat16)
    raise ValueError(f"unknown precision {setting!r}: expected auto, fp32, bf16 or fp16")


# --------------------------------------------------------------------------------------------
# RNG states


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(*, cuda: bool = True) -> dict[str, Any]:
    """The global RNG states as tensors and plain values (safe for ``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


class IsolatedRng:
    """A separate set of global CPU RNG states (python, numpy, torch) swapped in on demand.

    Code run inside :meth:`active` draws from (and advances) these states; the surrounding
    program's states are put back afterwards, untouched.
    """

    def __init__(self, seed: int = 0) -> None:
        self._states: dict[str, Any] = {}
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        outer = capture_rng(cuda=False)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA streams stay the trainer's
        self._states = capture_rng(cuda=False)
        restore_rng(outer)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = capture_rng(cuda=False)
        restore_rng(self._states)
        try:
            yield
        finally:
            self._states = capture_rng(cuda=False)
            restore_rng(outer)
