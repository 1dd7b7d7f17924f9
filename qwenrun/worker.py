"""`qwenrun worker`: this machine's GPUs and RAM, served to other qwenrun processes over RPC.

Contract: `serve(settings, out, err)` checks what it can before listening (an IPv4 address, a
port that is free, a llama.cpp built with RPC), says (through `out`) the endpoint, the devices
it serves and their memory, and (through `err`) a warning when it listens beyond loopback; then
it runs llama.cpp's RPC server (`ggml_backend_rpc_start_server`) in a thread until Ctrl-C or
SIGTERM, when it says so and ends the process with status 0. That server has no stop call,
serves one client at a time, keeps weights over 10 MiB in the cache folder by hash when it has
one (`QWENRUN_HOME/rpc-cache` by default: a second load of the same model then skips sending
them), and has no authentication: it listens on 127.0.0.1 unless `--host` says otherwise, with a
warning then.

Devices are served in this order: the GPUs (as llama.cpp numbers them), then the CPU, always
last, so a client reaches this machine's RAM as the worker's last device (`RPCn[host:port]`
with n = the number of GPUs). llama.cpp's own lines on the C stdout (a banner, one line per
connection) become a timestamped line when a client comes and when it leaves. Problems are
`QwenrunError`s; nothing here writes but through `out` and `err`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

from qwenrun import config, errors, hwprobe, units
from qwenrun.engine import native, rpc
from qwenrun.engine.devices import Device
from qwenrun.signals import sigterm_interrupts

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class WorkerSettings:
    host: str = LOOPBACK
    port: int = rpc.DEFAULT_PORT
    cache_dir: Path | None = None  # None: no weights cache
    threads: int | None = None  # None: this machine's physical cores


def default_cache_dir() -> Path:
    return config.qwenrun_home() / "rpc-cache"


def is_loopback(host: str) -> bool:
    return ipaddress.IPv4Address(host).is_loopback


def check_settings(settings: WorkerSettings) -> None:
    """What can be refused before llama.cpp is loaded."""
    try:
        ipaddress.IPv4Address(settings.host)
    except ValueError:
        raise errors.UsageError(
            f"--host {settings.host!r} is not an IPv4 address",
            hint="llama.cpp's RPC server listens on an IPv4 address: 127.0.0.1 (the default), "
            "this machine's LAN address, or 0.0.0.0 for every interface",
        ) from None
    if not 0 < settings.port < 65536:
        raise errors.UsageError(f"--port {settings.port} is not a port (1-65535)")
    if settings.threads is not None and settings.threads < 1:
        raise errors.UsageError("--threads must be 1 or more")


def check_port(host: str, port: int) -> None:
    """Bind and let go at once, as llama.cpp will (SO_REUSEADDR): a port in use is one line
    here, not a message of llama.cpp's after the devices were printed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise errors.WorkerError(
                    f"port {port} on {host} is already in use",
                    hint="pick another with --port, or stop what listens there",
                ) from None
            raise errors.WorkerError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint="use 127.0.0.1, an address of this machine, or 0.0.0.0",
            ) from None


def served_devices() -> tuple[list[int], list[Device]]:
    """This machine's devices in serving order (GPUs, then the CPU), handles and values; a
    device's `index` is its number on the worker (`RPC<index>[host:port]` to a client)."""
    found = [native.describe_device(h) for h in native.device_handles()]
    # Not another worker's devices, nor a helper of the CPU (BLAS, "accel"): no device alone.
    gpus = [raw for raw in found if not raw.rpc and raw.type in ("gpu", "igpu")]
    cpus = [raw for raw in found if not raw.rpc and raw.type == "cpu"]
    ordered = gpus + cpus[:1]
    return [raw.handle for raw in ordered], [
        Device(r.name, r.description, r.type, r.buffer_type, r.free_bytes, r.total_bytes, index=i)
        for i, r in enumerate(ordered)
    ]


def describe(settings: WorkerSettings, devs: list[Device]) -> list[str]:
    """The lines a worker prints once it is about to listen."""
    endpoint = f"{settings.host}:{settings.port}"
    client = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    lines = [
        f"qwenrun worker: serving on {endpoint} (RPC protocol {'.'.join(map(str, rpc.PROTOCOL))})"
    ]
    for dev in devs:
        what = "RAM" if dev.type == "cpu" else "memory"
        lines.append(
            f"  RPC{dev.index}[{client}:{settings.port}]  {dev.name} · {dev.description} · "
            f"{what} {units.gib(dev.total_bytes)} ({units.gib(dev.free_bytes)} free)"
        )
    cache = str(settings.cache_dir) if settings.cache_dir else "off"
    lines.append(f"  weights cache: {cache}")
    lines.append(
        f"use it from another qwenrun with --rpc {client}:{settings.port}; "
        "one client at a time; Ctrl-C stops"
    )
    return lines


def insecure_warning(settings: WorkerSettings) -> str | None:
    if is_loopback(settings.host):
        return None
    port = settings.port
    return (
        f"warning: listening on {settings.host}: llama.cpp's RPC protocol has no authentication "
        "or encryption, so anyone who can reach this port can use this machine's devices and "
        "memory. Across machines, prefer the default 127.0.0.1 and an SSH tunnel from the "
        f"client: ssh -N -L {port}:127.0.0.1:{port} THIS_HOST"
    )


def serve(
    settings: WorkerSettings,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> NoReturn:
    """Serve until Ctrl-C or SIGTERM, then end the process (llama.cpp's server cannot stop)."""
    check_settings(settings)
    if not native.supports_rpc():
        raise errors.WorkerError(
            "this llama-cpp-python was built without llama.cpp's RPC backend, so it cannot "
            "serve as a worker",
            hint=f"rebuild it: {rpc.rebuild_command()}",
        )
    check_port(settings.host, settings.port)
    handles, devs = served_devices()
    # The cores alone: a full `hwprobe.probe()` would start NVML and read disks for one number.
    threads = settings.threads or hwprobe.cores()[0]
    if settings.cache_dir is not None:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    warning = insecure_warning(settings)
    if warning:
        err(warning)
    for line in describe(settings, devs):
        out(line)
    endpoint = f"{settings.host}:{settings.port}"
    cache = str(settings.cache_dir) if settings.cache_dir else None
    with _llama_stdout(out):
        server = threading.Thread(
            target=native.rpc_start_server,
            args=(endpoint, cache, threads, handles),
            name="rpc-server",
            daemon=True,
        )
        server.start()
        with sigterm_interrupts():
            try:
                while server.is_alive():
                    server.join(0.5)
            except KeyboardInterrupt:
                out("qwenrun worker: stopped")
                _end(0)
    # The server thread only returns when it could not listen (a port taken in between).
    raise errors.WorkerError(
        f"llama.cpp could not listen on {endpoint}",
        hint="pick another --port, or stop what listens there",
    )


def _end(code: int) -> NoReturn:
    """End the process now: the server thread sits in llama.cpp and would never join."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# llama.cpp's server prints its own banner and a line per connection on the C stdout. A
# client opens many short connections while it looks at the devices and loads, then one that
# lasts while its model is loaded: connections less than this apart are one client's visit.
_VISIT_GAP_S = 1.0


class _Visits:
    """llama.cpp's connection lines, told as a client's arrival and departure."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._leaving: threading.Timer | None = None
        self._since = 0.0
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if text == "Accepted client connection":
                if self._leaving is not None:
                    self._leaving.cancel()
                    self._leaving = None
                if not self._since:
                    self._since = time.monotonic()
                    self._say("a client connected")
            elif text == "Client connection closed" and self._since:
                self._leaving = threading.Timer(_VISIT_GAP_S, self._left)
                self._leaving.daemon = True
                self._leaving.start()

    def _left(self) -> None:
        with self._lock:
            if self._leaving is not threading.current_thread():
                return  # a connection came in meanwhile: the visit goes on
            stayed = time.monotonic() - self._since - _VISIT_GAP_S
            self._say(f"the client left after {stayed:.0f} s")
            self._since, self._leaving = 0.0, None

    def _say(self, what: str) -> None:
        self._out(f"{time.strftime('%H:%M:%S')} {what}")


@contextlib.contextmanager
def _llama_stdout(out: Callable[[str], None]) -> Iterator[None]:
    """While inside, what llama.cpp writes to file descriptor 1 is read by a thread and said
    our way (its banner repeats what `describe` printed, and is dropped); Python's own
    stdout keeps writing to the real one."""
    sys.stdout.flush()
    real = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    previous = sys.stdout
    sys.stdout = os.fdopen(real, "w", buffering=1, encoding="utf-8", closefd=False)
    reader = threading.Thread(
        target=_relay, args=(os.fdopen(read_end, encoding="utf-8", errors="replace"), out)
    )
    reader.daemon = True
    reader.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = previous
        os.dup2(real, 1)


def _relay(pipe: TextIO, out: Callable[[str], None]) -> None:
    visits = _Visits(out)
    for raw in pipe:
        visits.line(raw.strip())
