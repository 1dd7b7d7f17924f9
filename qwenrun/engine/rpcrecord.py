"""Which RPC workers a qwenrun process is using, kept where its supervising parent can read them.

Contract: a process that registers a worker adds its endpoint to a small file named by its pid
under `QWENRUN_HOME/run/` (`record`); the file goes away when the process exits (atexit), when
its abort hook ends it (`forget`), or when the supervising parent (`engine/crash.py`) reads it
after the child died (`recorded`, which removes it). `death_line` is that parent's line for a
child that aborted while using workers: it names the workers that no longer accept connections.
`refuses` is the probe both sides use. Only the standard library and `config`: the parent
imports this module and nothing of llama.cpp.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from qwenrun import config

_recording: list[int] = []  # pids whose record this process writes (a fork writes its own)


def _path(pid: int) -> Path:
    return config.qwenrun_home() / "run" / f"workers-{pid}"


def record(endpoint: str) -> None:
    """Add `endpoint` to this process's record (best effort: without it, the parent's line
    only lacks the workers' names)."""
    pid = os.getpid()
    with contextlib.suppress(OSError):
        path = _path(pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(endpoint + "\n")
    if pid not in _recording:
        _recording.append(pid)
        atexit.register(forget, pid)


def forget(pid: int) -> None:
    with contextlib.suppress(OSError):
        _path(pid).unlink()


def recorded(pid: int) -> tuple[str, ...]:
    """The workers process `pid` had registered (read once: the record is removed)."""
    try:
        text = _path(pid).read_text("utf-8")
    except OSError:
        return ()
    forget(pid)
    return tuple(dict.fromkeys(ln.strip() for ln in text.splitlines() if ln.strip()))


def refuses(endpoint: str, timeout: float = 0.3) -> bool:
    """Whether nothing listens at `endpoint` ("host:port") any more. A live worker busy with
    another client still accepts into its backlog; one whose backlog is full, or a machine
    that does not answer, times out: not a refusal (unknown)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return False
    except OSError as exc:
        return isinstance(exc, ConnectionRefusedError) or exc.errno in (
            errno.ENETUNREACH,
            errno.EHOSTUNREACH,
        )


def death_line(pid: int, signum: int, settle_s: float = 1.0) -> str | None:
    """For the supervising parent: the line for child `pid`'s death by `signum` when it was
    using workers and aborted (None otherwise: the parent's own line says it)."""
    endpoints = recorded(pid)
    if not endpoints or signum != signal.SIGABRT:
        return None
    gone = refusing(endpoints, settle_s)
    if gone:
        return (
            f"error: llama.cpp aborted (SIGABRT): lost {', '.join(f'worker {e}' for e in gone)}"
            " (hint: start `qwenrun worker` there again, then the command)"
        )
    return (
        f"error: llama.cpp aborted (SIGABRT) while using workers {', '.join(endpoints)} "
        "(hint: a worker or the network to it may have failed; run again with --verbose)"
    )


def refusing(endpoints: Sequence[str], settle_s: float) -> list[str]:
    """The endpoints nothing listens at any more (`refuses`). A worker killed a moment ago
    may still accept for a few microseconds (the kernel closes its sockets one by one): ask
    again for up to `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        gone = [e for e in endpoints if refuses(e)]
        if gone or time.monotonic() > deadline:
            return gone
        time.sleep(0.1)
