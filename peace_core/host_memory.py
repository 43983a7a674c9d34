"""Keep freed host memory in the process for reuse, instead of glibc handing it back to the OS.

glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` pages and returns the
top of its heap to the OS once more than its trim threshold is free there. A forward allocates
and frees the same [tokens, ffn_dim] activations again and again, so with the defaults most of
them arrive as untouched pages and every element-wise op over them page-faults: on a 2-core CPU
a small image forward took ~190,000 minor faults and ran ~20 % slower than with the memory kept
(``benchmarks/workloads.py``). :func:`keep_freed_host_memory` raises the mmap threshold to glibc's
maximum (32 MiB; larger blocks stay mmapped, so a huge transient buffer still goes back) and
turns trimming off. Resident memory then stays at its peak rather than shrinking between steps;
the peak itself does not grow.

The ``peace`` commands apply it (with their thread plan); library users may call it once at
start. It does nothing off glibc, when ``PEACE_KEEP_HOST_MEMORY=0``, or when the environment
already tunes malloc (``MALLOC_*_`` variables or ``GLIBC_TUNABLES``), which then wins.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

#: ``PEACE_KEEP_HOST_MEMORY=0`` leaves malloc as the system configured it.
KEEP_HOST_MEMORY_ENV_VAR = "PEACE_KEEP_HOST_MEMORY"

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: ``-1`` switches trimming off altogether (mallopt(3)).
_NO_TRIM = -1

_state: dict[str, str] = {}


#: glibc's environment settings of what this module sets; when present, the user's choice wins.
_MALLOC_ENV_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TOP_PAD_",
)


def _user_tunes_malloc() -> bool:
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(name in os.environ for name in _MALLOC_ENV_VARS)


def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no mallopt with these parameters
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_host_memory() -> str:
    """Apply the policy above once per process; returns what this process's malloc does."""
    if "policy" in _state:
        return _state["policy"]
    raw = os.environ.get(KEEP_HOST_MEMORY_ENV_VAR, "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{KEEP_HOST_MEMORY_ENV_VAR}={raw!r}: expected 0 or 1")
    mallopt = _mallopt()
    if raw == "0":
        policy = f"system default ({KEEP_HOST_MEMORY_ENV_VAR}=0)"
    elif _user_tunes_malloc():
        policy = "as tuned by the environment"
    elif mallopt is None:
        policy = "system default (not glibc)"
    elif mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, _NO_TRIM):
        policy = "freed memory kept for reuse"
    else:
        policy = "system default (mallopt refused)"
    _state["policy"] = policy
    return policy


def host_memory_policy() -> str:
    """What :func:`keep_freed_host_memory` did in this process ("system default" before it ran)."""
    return _state.get("policy", "system default")
