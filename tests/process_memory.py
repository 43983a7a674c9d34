"""How much resident memory a call takes, for tests that promise bounded memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_growth(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result and how many bytes the resident set's peak rose above its level at the
    start (Linux: writing 5 to clear_refs resets the peak, VmHWM, to the current size)."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    result = call()
    return result, status("VmHWM") - start
