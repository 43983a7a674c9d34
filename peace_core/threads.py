"""How many CPU threads a process uses: torch's intra-op threads and the data-loading workers.

Torch's default is one intra-op thread per physical core of the machine, whatever the process is
allowed to use and whoever else runs there. When its OpenMP threads share cores with data workers,
other ranks or a CPU quota, every parallel region waits for a descheduled thread, and small models
slow down by an order of magnitude. :func:`plan_threads` splits the CPUs this process may use
(affinity and cgroup quota, divided among the ranks of the host) between compute and data
workers so that together they never exceed them; an explicit thread count overrides it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from peace_core.host_memory import host_memory_policy, keep_freed_host_memory

#: Overrides the automatic intra-op thread count of every ``peace`` command.
THREADS_ENV_VAR = "PEACE_THREADS"


@dataclass(frozen=True)
class ThreadPlan:
    """``intra_op`` torch threads and ``data_workers`` loader processes for one rank."""

    intra_op: int
    data_workers: int
    cpus: int
    source: str

    def describe(self) -> str:
        from peace_core.gemm import describe_cpu_gemm  # imports torch: only when describing

        workers = f"{self.data_workers} data worker{'s' if self.data_workers != 1 else ''}"
        return (
            f"threads: {self.intra_op} torch intra-op, {workers}, on {self.cpus} CPU(s) for this "
            f"process ({self.source}; --threads or {THREADS_ENV_VAR} to change); host malloc: "
            f"{host_memory_policy()}; fp32 CPU GEMM: {describe_cpu_gemm()}"
        )


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    try:
        limit, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(1, math.ceil(int(limit) / int(period)))


def _requested_threads(requested: int | None) -> tuple[int | None, str]:
    if requested is not None:
        return requested, "as asked"
    raw = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not raw:
        return None, "chosen"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV_VAR}={raw!r}: expected a positive number of threads")
    return int(raw), f"from {THREADS_ENV_VAR}"


def plan_threads(
    *,
    data_workers: int = 0,
    threads: int | None = None,
    cpus: int | None = None,
    local_ranks: int | None = None,
) -> ThreadPlan:
    """Split this rank's CPUs between torch's intra-op threads and ``data_workers``.

    ``threads`` (or ``PEACE_THREADS``) fixes the intra-op count and keeps ``data_workers`` as
    given. Otherwise each rank of the host (``LOCAL_WORLD_SIZE`` under torchrun) gets an equal
    share of the CPUs; at most all but one of them go to data workers (never more than asked),
    and compute takes the rest.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if data_workers < 0:
        raise ValueError(f"data_workers must be >= 0, got {data_workers}")
    ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = max(1, (cpus or available_cpus()) // max(1, ranks))
    fixed, source = _requested_threads(threads)
    if fixed is not None:
        return ThreadPlan(fixed, data_workers, share, source)
    workers = min(data_workers, share - 1)
    return ThreadPlan(max(1, share - workers), workers, share, source)


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op thread count for this process, keep its freed host memory for reuse
    (:mod:`peace_core.host_memory`) and settle its fp32 GEMM library (:mod:`peace_core.gemm`):
    all three set how fast the same work runs on a CPU."""
    import torch

    from peace_core.gemm import cpu_gemm

    torch.set_num_threads(plan.intra_op)
    keep_freed_host_memory()
    cpu_gemm()
