"""Real `qwenrun worker` processes on loopback, and clients that use them, for tests and benchmarks.

Contract: `start_worker()` runs `python -m qwenrun worker` on a free loopback port (a minimal
environment, as `proc.child_env` builds it), reads its output in a thread, and returns once it
says it serves and accepts connections; `WorkerProcess.kill()` ends its serving process by
SIGKILL, as a crash would, and `stop()` sends SIGTERM as a user would. `run_client()` runs
`qwenrun.testing.rpc_client` in a fresh interpreter: a process that registered a worker cannot
forget it, and llama.cpp ends the process that loses one, so a client is never the test's own
process. Nothing of qwenrun is patched.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from qwenrun.testing.proc import child_env

READY = "qwenrun worker: serving on"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    port: int
    host: str = "127.0.0.1"
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def buffer(self, device: int = 0) -> str:
        """The buffer type name of the worker's `device` as a client sees it."""
        return f"RPC{device}[{self.endpoint}]"

    def server(self, timeout: float = 30) -> psutil.Process:
        """The process that serves: qwenrun's supervised child (the parent only waits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = psutil.Process(self.proc.pid).children()
            if children:
                return children[0]
            time.sleep(0.05)
        raise AssertionError("the worker started no serving process")

    def kill(self) -> None:
        """SIGKILL the serving process, as a crash or the OOM killer would."""
        self.server().send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first line of its stdout that contains `text` (waiting for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.out):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the worker never said {text!r}: {self.out} {self.err}")


def start_worker(
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60,
) -> WorkerProcess:
    """`qwenrun worker --port PORT ARGS…`, ready to serve (unless `wait` is false)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenrun", "worker", "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(env),
    )
    worker = WorkerProcess(proc, port)
    for stream, lines in ((proc.stdout, worker.out), (proc.stderr, worker.err)):
        threading.Thread(target=_collect, args=(stream, lines), daemon=True).start()
    if wait:
        worker.wait_for(READY, timeout)
        _wait_connectable(worker, timeout)
    return worker


def _collect(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


def _wait_connectable(worker: WorkerProcess, timeout: float) -> None:
    # The banner comes just before llama.cpp binds the port.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((worker.host, worker.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"worker {worker.endpoint} never accepted a connection")


def client_command(**options: Any) -> list[str]:
    """The argv of `python -m qwenrun.testing.rpc_client` with these options."""
    argv = [sys.executable, "-m", "qwenrun.testing.rpc_client"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, value if isinstance(value, str) else json.dumps(value)]
    return argv


def run_client(
    timeout: float = 180, env: dict[str, str] | None = None, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run a client to the end (see `rpc_client` for the options)."""
    return subprocess.run(
        client_command(**options),
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
