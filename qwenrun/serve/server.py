"""Running `qwenrun serve`: bind, answer `/health` while the model loads, serve, stop.

Contract: `bind(host, port)` makes the listening socket (a taken port is a one-line
`UsageError` before anything loads; port 0 gives a free one, for tests). `Server(state,
sock)` runs the app of `app.build_app` on uvicorn in a thread of its own, so the caller's
main thread stays free for what `run` and `chat` do there: the start-up's questions and
progress bars (`launch.start`), and Ctrl-C. `serve_forever` then waits for Ctrl-C or
SIGTERM; `stop` cancels the running and waiting generations and shuts the server down;
the engine thread is stopped and the engine closed. Nothing here prints: the request log
and notices go to the state's `log`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from qwenrun import errors
from qwenrun.serve.app import ServerState, build_app

STARTUP_TIMEOUT_S = 60.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a `UsageError` saying why not."""
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


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # where a client on this machine reaches it
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def model_id_for(path: Path, quant: str | None) -> str:
    """The model's name in the API: its catalog name (or hub repo) and quant, as `run` and
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

    @property
    def url(self) -> str:
        return url_for(self.sock)

    def start(self) -> None:
        """Serve on a thread; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise errors.BackendError(
                    f"the HTTP server did not start: {self._failure or 'timed out'}"
                )
            self._thread.join(0.01)

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.sock])
        except BaseException as exc:
            self._failure = exc

    def serve_forever(self) -> None:
        """Wait until Ctrl-C or SIGTERM (then stop), or until the server stops by itself."""
        with _sigterm_interrupts():
            try:
                while self._thread.is_alive():
                    self._thread.join(0.5)
            except KeyboardInterrupt:
                pass
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
        if self._thread.is_alive():
            self._thread.join(30)
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


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM (a service manager's stop) stops the server as Ctrl-C does."""
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
