"""SIGTERM as Ctrl-C, for the commands that run until they are stopped (`serve`, `worker`).

Contract: `sigterm_interrupts()` is a context manager: inside it, in the main thread, SIGTERM
(what a service manager or `kill` sends) raises `KeyboardInterrupt` as Ctrl-C does, so one
stop path ends the command cleanly; the previous handler comes back on exit. In another
thread it does nothing (Python only lets the main thread set handlers).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM stops the command as Ctrl-C does (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
