"""Running `qwenrun serve`: bind, answer `/health` while the model loads, serve, stop.

Contract: `bind(host, port)` makes the listening socket (a taken port, a port outside 0 to 65535
or an unknown host is a one-line `UsageError` before anything loads; port 0 gives a free one,
for tests). `listening(sock)` says where it listens: the address it is bound to, and for every
interface (0.0.0.0, ::) the URLs that reach it from this machine and from others.
`served_id(model)` is the model's id in the API, decided from MODEL before anything loads so
that it never changes. `Server(state, sock)` runs the app of `app.build_app` on uvicorn in a
thread of its own, so the caller's main thread stays free for the start-up it runs meanwhile
(`launch.start`: its questions and progress bars, the load, while `/health` answers that the
model is loading) and for Ctrl-C. `serve_forever` then waits for Ctrl-C or SIGTERM; `stop`
cancels the running and waiting generations (their answers say that the server stopped:
`replies`, `endpoints`), lets uvicorn finish sending them (each request gets its log line) and
shuts the server down; the engine thread is stopped and the engine closed. Nothing here prints:
the request log and notices go to the state's `log`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from qwenrun import errors
from qwenrun.serve.app import build_app
from qwenrun.serve.state import ServerState
from qwenrun.signals import sigterm_interrupts

STARTUP_TIMEOUT_S = 60.0
MAX_PORT = 65535
DEFAULT_ID = "default"  # the id of the model a server chose itself (no MODEL given)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a `UsageError` saying why not."""
    if not 0 <= port <= MAX_PORT:
        # Checked here: the socket layer would take 70000 as 70000 % 65536 = 4464, and
        # a negative port is a puzzling "Servname not supported" from getaddrinfo.
        raise errors.UsageError(
            f"--port {port} is not a port: give one from 1 to {MAX_PORT} (0: any free port)"
        )
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise errors.UsageError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        taken = exc.errno in (48, 98)  # EADDRINUSE on macOS, Linux
        raise errors.UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="another server has that port; pick another with --port" if taken else None,
        ) from None
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_EVERY_INTERFACE = ("0.0.0.0", "::")


def _http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def url_for(sock: socket.socket) -> str:
    """Where a client on this machine reaches the server."""
    host, port = sock.getsockname()[:2]
    if host in _EVERY_INTERFACE:
        host = "127.0.0.1"
    return _http(host, port)


def listening(sock: socket.socket) -> str:
    """Where the server listens, in words (see the module docstring)."""
    host, port = sock.getsockname()[:2]
    bound = _http(host, port)
    if host not in _EVERY_INTERFACE:
        return f"listening on {bound} (OpenAI API: {bound}/v1)"
    here = url_for(sock)
    there = _network_address(sock.family)
    others = f", {_http(there, port)}/v1 from other machines" if there else ""
    return f"listening on {bound}, every interface (OpenAI API: {here}/v1 here{others})"


def _network_address(family: int) -> str | None:
    """This machine's address on its network (the source address of its default route), or
    None without one. A UDP socket's connect only looks the route up: nothing is sent."""
    target = ("192.0.2.1", 9) if family == socket.AF_INET else ("2001:db8::1", 9)  # TEST-NETs
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if is_loopback(address) or address in _EVERY_INTERFACE else address


def served_id(model: str | None) -> str:
    """The model's id in the API (`/v1/models`, each response's `model`), from MODEL as the
    user gave it, before anything loads, and kept while it loads and after: a file's name
    (inside the Hugging Face cache: its reference, see `model_id_for`), a reference as `run`
    and `pull` write it (with a quant only when MODEL names one), or `default` when the
    server chooses the model itself (which model is in the card's `qwenrun` facts). A
    reference that does not parse raises its `UsageError` here, before the port is taken."""
    if model is None:
        return DEFAULT_ID
    from qwenrun.hub import names, refs

    ref = refs.parse_ref(model)
    if ref.path is not None:
        return model_id_for(ref.path, names.parse_quant(ref.path.name))
    if ref.repos:
        return refs.reference_for(ref.repos[0], ref.quant)
    return model.strip()


def model_id_for(path: Path, quant: str | None) -> str:
    """A file's name in the API: its catalog name (or hub repo) and quant, as `run` and
    `pull` take it, for a model from the Hugging Face cache; the file's stem otherwise."""
    from qwenrun.hub import refs

    for part in path.parts:
        if part.startswith("models--"):
            repo = part[len("models--") :].replace("--", "/", 1)
            return refs.reference_for(repo, quant)
    return path.stem


class Server:
    """uvicorn serving the app on a bound socket, on its own thread."""

    def __init__(self, state: ServerState, sock: socket.socket) -> None:
        self.state = state
        self.sock = sock
        config = uvicorn.Config(
            build_app(state),
            log_config=None,  # qwenrun writes its own request lines
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="qwenrun-http", daemon=True)
        self._failure: BaseException | None = None
        self._stopped = False
        # Set when uvicorn has finished (every response sent, every log line written). Waited
        # for instead of `Thread.join`: a KeyboardInterrupt that lands inside `join` marks
        # the thread as ended while it still runs (Python 3.11's bpo-45274 fix), and the
        # process would then exit in the middle of the answers being cut off.
        self._done = threading.Event()

    @property
    def url(self) -> str:
        return url_for(self.sock)

    @property
    def listening(self) -> str:
        return listening(self.sock)

    def start(self) -> None:
        """Serve on a thread; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._uvicorn.started:
            if self._done.is_set() or time.monotonic() > deadline:
                raise errors.BackendError(
                    f"the HTTP server did not start: {self._failure or 'timed out'}"
                )
            self._done.wait(0.01)

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.sock])
        except BaseException as exc:
            self._failure = exc
        finally:
            self._done.set()

    def serve_forever(self) -> None:
        """Wait until Ctrl-C or SIGTERM (then stop), or until the server stops by itself."""
        with sigterm_interrupts(), contextlib.suppress(KeyboardInterrupt):
            self._done.wait()
        self.stop()

    def stop(self) -> None:
        """Cancel what is running and waiting, stop serving, close the engine."""
        if self._stopped:
            return
        self._stopped = True
        if self.state.status != "failed":
            self.state.status = "stopping"
        self.state.worker.cancel_all()
        self._uvicorn.should_exit = True
        if self._thread.ident is not None:  # started
            self._done.wait(30)
        self.state.worker.stop()
        model = self.state.model
        if model is not None:
            model.engine.close()
        self.sock.close()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
