"""RPC workers from the client's side: checked, registered once, and never a silent death.

Contract:
- `connect(endpoints)` makes `qwenrun worker`s (llama.cpp's ggml-rpc servers) usable by the next
  model load: each endpoint is checked here first, over a socket of our own (reachable within
  `CONNECT_TIMEOUT_S`, answering ggml-rpc's HELLO within `REPLY_TIMEOUT_S`, with the same major
  protocol version and no newer minor one), because llama.cpp aborts the whole process on any of
  those failures (ggml-rpc.cpp: `rpc_dispatcher::start`). Then it is registered with llama.cpp
  (`ggml_backend_rpc_add_server`, `ggml_backend_register`), once per process per endpoint, and
  its devices are listed as `devices.Device` values. A failure is a `WorkerError` with one line
  and a hint; a build without RPC is one too, with the command that rebuilds llama-cpp-python
  with it. `prepare(placement, mparams)` is what a load calls: the placement's workers
  connected, then its devices and split set (`devices.apply`). `parse_endpoints` reads `--rpc`;
  `round_trips(endpoint)` measures a worker's round trip on the wire, for a speed model to price
  hand-offs with.
- Once a worker is registered, a worker lost later (killed, its machine gone) makes llama.cpp
  abort: ggml-rpc has no error path, a failed send or receive is `GGML_ABORT`. The abort hook
  installed here turns that into one `error:` line naming the lost worker and exit status
  `LOST_EXIT_CODE` (the one `cli` gives a `WorkerError`), instead of ggml's message, backtrace
  and SIGABRT. A dead worker's socket fails at once (the kernel resets the connection); a
  machine that vanishes from the network would leave a receive waiting forever, so
  `harden_connections` sets TCP keepalive and a user timeout on the connections llama.cpp holds
  after a load: such a worker is declared lost within about `DEAD_PEER_S` seconds. A worker that
  is alive but stuck (stopped, swapping) is waited for. `when_lost(keep)` lets a caller save its
  work first (the REPL's conversation), its words going into the hint.
- The endpoints in use are also written where the supervising parent (`engine/crash.py`) can
  read them by the child's pid (`engine/rpcrecord.py`), so an abort that the hook did not see
  still ends with a line that names the workers.

The protocol facts (ggml-rpc.cpp, ggml-rpc.h, transport.h at the pinned llama.cpp): a command
is one byte, a little-endian u64 size and that many bytes; a reply is a u64 size and the bytes.
HELLO is command 14 with `RPC_CONN_CAPS_SIZE` (24) bytes of transport capabilities (all zero:
plain TCP); its reply is major, minor, patch, a pad byte and 24 capability bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun import errors
from qwenrun.engine import devices, native, rebuild, rpcrecord
from qwenrun.engine.loadconfig import Placement

# ggml-rpc.h RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of the llama.cpp that llama-cpp-python 0.3.36
# vendors (tests check it against a real worker).
PROTOCOL = (7, 0, 0)
DEFAULT_PORT = 50052
CONNECT_TIMEOUT_S = 3.0
REPLY_TIMEOUT_S = 5.0
LOST_EXIT_CODE = 7  # cli.EXIT_CODES[errors.WorkerError]
# Keepalive on the connections llama.cpp holds: a silent peer is probed after KEEPIDLE s, every
# KEEPINTVL s, and given up after KEEPCNT probes or USER_TIMEOUT ms of unacknowledged data.
_KEEPIDLE, _KEEPINTVL, _KEEPCNT, _USER_TIMEOUT_MS = 5, 2, 3, 15_000
DEAD_PEER_S = 15

_HELLO = 14
_GET_ALIGNMENT = 1  # enum rpc_cmd
_CAPS = 24
_HELLO_REPLY = 4 + _CAPS

SAME_QWENRUN = "run the same qwenrun (and llama-cpp-python build) on every machine"


@dataclass(frozen=True)
class Worker:
    """A registered worker: its endpoint and its devices."""

    endpoint: str
    devices: tuple[devices.Device, ...]


# --------------------------------------------------------------------------------------
# Endpoints and the handshake (no llama.cpp needed)


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` → (host, port). ggml-rpc speaks IPv4 only (host names are resolved)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.UsageError(
            f"{text!r} is not a worker address", hint="give HOST:PORT, e.g. 192.168.1.20:50052"
        )
    if host.startswith("[") or ":" in host:
        raise errors.UsageError(
            f"{text!r}: llama.cpp's RPC backend speaks IPv4 only",
            hint="give an IPv4 address or a host name",
        )
    return host, int(port)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT…]` (as `--rpc` takes them) → normalised endpoints, in order."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, port = parse_endpoint(part)
        if f"{host}:{port}" not in out:
            out.append(f"{host}:{port}")
    return tuple(out)


# The HELLO command: its id, the size of what follows, and the transport capabilities (none:
# plain TCP).
_HELLO_REQUEST = bytes([_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS)


def hello(
    endpoint: str,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    reply_timeout: float = REPLY_TIMEOUT_S,
) -> tuple[int, int, int]:
    """The RPC protocol version a worker speaks; a `WorkerError` if it cannot be asked."""
    with _open(endpoint, connect_timeout) as sock:
        return _handshake(sock, endpoint, reply_timeout)


def _open(endpoint: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connection to the worker at `endpoint`; a `WorkerError` when none can be made."""
    host, port = parse_endpoint(endpoint)
    try:
        return socket.create_connection((host, port), timeout=connect_timeout)
    except socket.gaierror:
        raise errors.WorkerError(
            f"worker {endpoint}: the host name {host!r} does not resolve",
            hint="check the address",
        ) from None
    except TimeoutError:
        raise errors.WorkerError(
            f"worker {endpoint} did not accept a connection within {connect_timeout:g} s",
            hint="check the address, that `qwenrun worker` runs there, and the network",
        ) from None
    except OSError as exc:
        raise errors.WorkerError(
            f"worker {endpoint} is unreachable ({exc.strerror or exc})",
            hint=f"start `qwenrun worker --port {port}` there, or check the address",
        ) from None


def _handshake(sock: socket.socket, endpoint: str, reply_timeout: float) -> tuple[int, int, int]:
    """Send HELLO on `sock` and check the worker's version (see `hello`)."""
    sock.settimeout(reply_timeout)
    try:
        sock.sendall(_HELLO_REQUEST)
        size = struct.unpack("<Q", _recv_exactly(sock, 8))[0]
        reply = _recv_exactly(sock, min(size, 1 << 16)) if size >= 3 else b""
    except TimeoutError:
        raise errors.WorkerError(
            f"worker {endpoint} accepted the connection but did not answer within "
            f"{reply_timeout:g} s",
            hint="a worker serves one client at a time: is another qwenrun using it?",
        ) from None
    except (OSError, EOFError):
        raise errors.WorkerError(
            f"{endpoint} closed the connection at the handshake: not a qwenrun worker, or "
            "one that speaks another RPC protocol version",
            hint=SAME_QWENRUN,
        ) from None
    if len(reply) < 3:
        raise errors.WorkerError(
            f"{endpoint} answered the handshake with {size} bytes: not a qwenrun worker",
            hint=SAME_QWENRUN,
        )
    version = (reply[0], reply[1], reply[2])
    ours = _dotted(PROTOCOL)
    if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1] or size != _HELLO_REPLY:
        raise errors.WorkerError(
            f"worker {endpoint} speaks RPC protocol {_dotted(version)}, this qwenrun's "
            f"llama.cpp speaks {ours}",
            hint=SAME_QWENRUN,
        )
    return version


def round_trips(endpoint: str, calls: int = 200) -> list[float]:
    """Seconds of each of `calls` ggml-rpc round trips to a worker (GET_ALIGNMENT, which it
    answers without work) on one connection after the HELLO: the network and the worker's
    dispatch, the floor of what a hand-off between devices costs. Ask before a model is
    loaded over the worker: it serves one client at a time. `WorkerError` as `hello`."""
    request = bytes([_GET_ALIGNMENT]) + struct.pack("<QI", 4, 0)  # device 0
    times = []
    with _open(endpoint) as sock:
        _handshake(sock, endpoint, REPLY_TIMEOUT_S)  # a clear error first, as `hello` gives
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(calls):
                t0 = time.perf_counter()
                sock.sendall(request)
                _recv_exactly(sock, 8 + 8)  # size, then the u64 alignment
                times.append(time.perf_counter() - t0)
        except (OSError, EOFError) as exc:
            raise errors.WorkerError(
                f"worker {endpoint} stopped answering while its round trip was measured ({exc})",
                hint="check that it still runs",
            ) from None
    return times


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(x) for x in version)


def rebuild_command() -> str:
    """The command that rebuilds this llama-cpp-python with RPC (and CUDA where it has a GPU
    backend now)."""
    version = rebuild.pinned_llama_version() or rebuild.installed_llama_version()
    cuda = rebuild.keeps_cuda(native.supports_gpu_offload())
    return rebuild.rpc_install_command(version, cuda=cuda)


# --------------------------------------------------------------------------------------
# Registration


_registered: dict[str, Worker] = {}
_lock = threading.Lock()


def connect(endpoints: Iterable[str]) -> tuple[Worker, ...]:
    """Check and register each worker (once per process); the workers, in the order given."""
    wanted = [f"{h}:{p}" for h, p in (parse_endpoint(e) for e in endpoints)]
    if not wanted:
        return ()
    if not native.supports_rpc():
        raise errors.WorkerError(
            "this llama-cpp-python was built without llama.cpp's RPC backend, so it cannot "
            "use workers",
            hint=f"rebuild it: {rebuild_command()}",
        )
    with _lock:
        for endpoint in wanted:
            if endpoint in _registered:
                continue
            hello(endpoint)  # llama.cpp would abort on a worker it cannot use: ask first
            _install_abort_hook()
            rpcrecord.record(endpoint)
            handles = native.rpc_add_server(endpoint)
            if not handles:
                raise errors.WorkerError(f"worker {endpoint} serves no device")
            found = tuple(d for d in devices.list_devices() if d.endpoint == endpoint)
            _registered[endpoint] = Worker(endpoint, found)
        return tuple(_registered[e] for e in wanted)


def prepare(placement: Placement, mparams: Any) -> tuple[Any, ...]:
    """Before a load: register the placement's workers, then set the model's devices and
    split (`devices.apply`). Returns what must outlive the model."""
    connect(placement.rpc_workers)
    return devices.apply(placement, mparams)


def connected() -> tuple[str, ...]:
    """The endpoints registered in this process so far."""
    return tuple(_registered)


def harden_connections(endpoints: Iterable[str]) -> int:
    """Keepalive and a user timeout on this process's TCP connections to these workers (those
    llama.cpp holds while a model is loaded), so a worker whose machine vanishes is declared
    lost instead of waited for forever. Linux; returns how many connections were set."""
    endpoints = list(endpoints)
    if not endpoints or not sys.platform.startswith("linux"):
        return 0
    import psutil

    wanted = _addresses(endpoints)
    done = 0
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.fd < 0 or not conn.raddr or (conn.raddr.ip, conn.raddr.port) not in wanted:
            continue
        # A duplicate of llama.cpp's descriptor: options set on it are the socket's own.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fd)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPIDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPINTVL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPCNT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)
            done += 1
    return done


# --------------------------------------------------------------------------------------
# A worker lost: ggml's abort, turned into one line


_abort_callback = None
# What to do before the process ends for a lost worker (the REPL keeps its conversation):
# each returns a few words for the hint, or None.
_when_lost: list[Callable[[], str | None]] = []


def when_lost(keep: Callable[[], str | None]) -> None:
    """Call `keep` before the process ends because a worker was lost; its words (such as
    where a conversation was saved) go into the one line's hint."""
    _when_lost.append(keep)


def _install_abort_hook() -> None:
    global _abort_callback
    if _abort_callback is not None:
        return
    _abort_callback = native.ABORT_CALLBACK(_on_abort)
    native.set_abort_callback(_abort_callback)
    # Past interpreter shutdown Python cannot run the hook; ggml's own (without the slow
    # debugger backtrace) ends the process then, and the supervising parent says why.
    atexit.register(_quiet_default_abort)


def _quiet_default_abort() -> None:
    os.environ["GGML_NO_BACKTRACE"] = "1"
    native.set_abort_callback(None)


def _on_abort(message: bytes | None) -> None:
    """ggml is about to abort(): say why in one line and end the process ourselves."""
    code = 128 + signal.SIGABRT
    try:
        line, lost = abort_line((message or b"").decode("utf-8", "replace"), connected())
        if lost:
            code = LOST_EXIT_CODE
            for keep in _when_lost:
                with contextlib.suppress(Exception):
                    note = keep()
                    if note and line.endswith(")"):
                        line = f"{line[:-1]}; {note})"
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # what was answered so far stays answered
        os.write(2, (line + "\n").encode())
        rpcrecord.forget(os.getpid())
    finally:
        os._exit(code)


def abort_line(message: str, endpoints: Sequence[str]) -> tuple[str, bool]:
    """The one line for ggml's abort `message` while `endpoints` were in use, and whether it
    was a worker that was lost (one named in the message, one that `gone` finds, or ggml-rpc's
    own complaint about a reply that never came)."""
    named = [e for e in endpoints if e in message]
    gone = named or _gone(endpoints)
    rpc_fault = "RPC" in message or bool(named)
    reason = message.split(": ", 1)[-1].strip()  # drop ggml's "file.cpp:123: "
    if gone:
        which = ", ".join(f"worker {e}" for e in gone)
        return (
            f"error: lost {which}: it stopped, or the network to it failed "
            f"(hint: start `qwenrun worker` there again, then the command)",
            True,
        )
    if rpc_fault:
        return (
            f"error: lost the connection to a worker ({', '.join(endpoints)}): {reason} "
            "(hint: check that every worker still runs, then start the command again)",
            True,
        )
    return (f"error: llama.cpp aborted: {reason} (hint: run again with --verbose)", False)


def _gone(endpoints: Sequence[str], settle_s: float = 1.0) -> list[str]:
    """The workers that are gone: this process's connection to them was closed by their end
    (CLOSE_WAIT), or they refuse new connections (asked again for up to `settle_s`: a worker
    killed a moment ago may still accept for a few microseconds). A worker whose machine does
    not answer at all is not declared gone here (unknown)."""
    closed = _closed_by_peer(endpoints)
    return [e for e in endpoints if e in closed] or rpcrecord.refusing(endpoints, settle_s)


def _addresses(endpoints: Iterable[str]) -> dict[tuple[str, int], str]:
    """Each endpoint by its (IPv4 address, port), as the connections of this process show
    them; one whose host does not resolve is left out."""
    out = {}
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        with contextlib.suppress(OSError):
            out[(socket.gethostbyname(host), port)] = endpoint
    return out


def _closed_by_peer(endpoints: Sequence[str]) -> set[str]:
    try:
        import psutil

        conns = psutil.Process().net_connections(kind="tcp4")
    except Exception:  # psutil cannot read this process's sockets here: probe instead
        return set()
    addrs = _addresses(endpoints)
    return {
        addrs[(c.raddr.ip, c.raddr.port)]
        for c in conns
        if c.raddr and (c.raddr.ip, c.raddr.port) in addrs and c.status == "CLOSE_WAIT"
    }
