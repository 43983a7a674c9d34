"""The host allocator policy: freed activations are reused rather than re-faulted from the OS."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from peace_core.host_memory import KEEP_HOST_MEMORY_ENV_VAR

# Prints the policy; the bytes glibc holds in mmapped blocks while a 20 MiB tensor lives and the
# free bytes its heap keeps after the tensor is freed (mallinfo2); then the minor page faults of
# allocating and freeing four 12 MiB tensors three times over, after a first such round.
_PROBE = textwrap.dedent(
    """
    import ctypes, resource, torch
    from peace_core.host_memory import keep_freed_host_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    print(keep_freed_host_memory())
    tensor = torch.empty(5 * 2**20)
    print(libc.mallinfo2().hblkhd)
    del tensor
    print(libc.mallinfo2().fordblks)
    def churn():
        for _ in range(3):
            tensors = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(4)]
            del tensors
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
MIB = 2**20

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not hasattr(ctypes.CDLL(None), "mallinfo2"),  # glibc >= 2.33
    reason="the policy applies to glibc's malloc",
)


def _probe(**env: str) -> tuple[str, int, int, int]:
    """(policy, mmapped bytes while 20 MiB live, heap free bytes after, page faults of churn)."""
    ours = ("GLIBC_TUNABLES", KEEP_HOST_MEMORY_ENV_VAR)
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_") and name not in ours
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    policy, mmapped, heap_free, faults = done.stdout.strip().splitlines()[-4:]
    return policy, int(mmapped), int(heap_free), int(faults)


@glibc_only
def test_freed_activations_stay_in_the_heap_for_reuse() -> None:
    policy, mmapped, heap_free, faults = _probe()
    assert policy == "freed memory kept for reuse"
    assert mmapped < 20 * MIB <= heap_free  # served from the heap, and kept there once freed
    assert faults < 1000  # 3 x 48 MiB reused: no fresh pages (the system default: ~36,000)


@glibc_only
def test_switched_off_the_system_default_stays() -> None:
    policy, mmapped, heap_free, _ = _probe(**{KEEP_HOST_MEMORY_ENV_VAR: "0"})
    assert policy == f"system default ({KEEP_HOST_MEMORY_ENV_VAR}=0)"
    assert mmapped >= 20 * MIB > heap_free  # glibc's own: mmapped, and unmapped when freed


@glibc_only
def test_the_environment_s_own_malloc_settings_win() -> None:
    policy, mmapped, _, _ = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert policy == "as tuned by the environment"
    assert mmapped >= 20 * MIB
    policy, _, _, _ = _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
    assert policy == "as tuned by the environment"


def test_a_bad_switch_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from peace_core import host_memory

    monkeypatch.setattr(host_memory, "_state", {})
    monkeypatch.setenv(KEEP_HOST_MEMORY_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=f"{KEEP_HOST_MEMORY_ENV_VAR}='yes': expected 0 or 1"):
        host_memory.keep_freed_host_memory()
