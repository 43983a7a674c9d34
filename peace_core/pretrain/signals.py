"""SIGTERM and Ctrl-C end a training run at a step boundary, with a checkpoint.

A scheduler's SIGTERM (preemption, ``scancel``, torchrun stopping its workers) or a first Ctrl-C
sets a flag; the trainer finishes the step it is in, the ranks agree to stop, a checkpoint is
written and ``fit`` returns with ``stopped_by`` set. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Catches :data:`STOP_SIGNALS` while :meth:`installed`; :attr:`received` names the first."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # Signal handlers can only be set from the main thread; elsewhere the defaults stay.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def exit_code(signal_name: str) -> int:
    """The shell's code for a process ended by ``signal_name`` (128 + its number)."""
    return 128 + int(signal.Signals[signal_name])
