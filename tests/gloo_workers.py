"""Running a test's worker function on several spawned CPU processes (gloo tests)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def run_workers(
    worker: Callable[..., None], args: tuple[Any, ...], *, nprocs: int, timeout_s: float
) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; a hang past ``timeout_s``
    terminates them and fails the test. Skips without the gloo backend."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    # Spawned children import the worker's module by name: make its root importable there.
    name = worker.__module__
    module_file = sys.modules[name].__file__
    assert module_file is not None
    import_root = str(Path(module_file).resolve().parents[len(name.split(".")) - 1])
    sys.path.insert(0, import_root)
    try:
        context = mp.start_processes(
            _run_then_exit, args=(worker, *args), nprocs=nprocs, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                pytest.fail(f"{nprocs} gloo workers did not finish within {timeout_s:.0f}s")
    finally:
        sys.path.remove(import_root)


def _run_then_exit(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """Run the worker, then leave without the interpreter's finalization.

    Gloo's C++ threads can still hold work objects when the interpreter tears down, even after
    ``destroy_process_group``; freeing them then aborts the process ("terminate called without
    an active exception") after the worker has finished and saved its results. The worker's
    results are on disk by now, so the process ends here. A worker that raises does not get
    here: the spawn wrapper reports its traceback as usual."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
