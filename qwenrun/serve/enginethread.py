"""The one thread that uses the engine, and the bounded queue of requests waiting for it.

Contract: `Worker(max_waiting)` starts a daemon thread that runs submitted jobs in order,
one at a time (the engine is not thread-safe). `submit(fn)`, called on the event loop,
queues a `Job` for `fn(job)`, or raises `Busy` (with a Retry-After estimate from a running
mean of job times) when one job runs and `max_waiting` more wait already. A job's `fn` runs on
the worker's thread and hands what it makes to `job.emit`; the event loop reads it with
`await job.batch()`, everything emitted since the last batch, the last item being `END`. An
exception in `fn` is kept as `job.error` (logged with its traceback unless it is a qwenrun
error or a `RequestError`, which are the request's own fault) and the stream still ends.
`job.cancel` stops a generation at its next token or batch; `cancel_all` and `stop` end the
running and waiting jobs when the server stops, and mark them `stopped` (cut by the server,
not left by their client), so that their answers can say so. Knows nothing of HTTP (the app
turns `Busy` into a 503).
"""

from __future__ import annotations

import asyncio
import collections
import math
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from qwenrun import errors
from qwenrun.serve.protocol import RequestError

DEFAULT_MAX_WAITING = 8

END = object()  # the last item of a job's stream


class Busy(Exception):
    """One job runs and the queue is full: come back in `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are waiting for the model")
        self.waiting = waiting
        self.retry_after = retry_after


class Job:
    """One request's work on the engine thread, and the stream of what it emits.

    `emit` is called on the engine thread; `batch()` is awaited on the event loop. `cancel`
    stops the generation (the engine checks it between tokens and prompt batches).

    Items wait in a deque, and the loop is woken once per batch, not once per item: while
    it is busy sending, the engine keeps going without a wake-up (a write to the loop's
    self-pipe, and the GIL handed back and forth) for every token.
    """

    def __init__(self, fn: Callable[[Job], None], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.cancel = threading.Event()
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._woken = False
        self.error: BaseException | None = None
        self.stopped = False  # cancelled because the server is stopping (`cancel_all`)
        self.ended = False  # its last item was read
        self.over = asyncio.Event()  # its last item was emitted

    def emit(self, item: Any) -> None:
        if item is END:
            self._call(self.over.set)
        with self._lock:
            self._items.append(item)
            if self._woken:
                return  # the loop has been told already and has not read yet
            self._woken = True
        self._call(self._ready.set)

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is gone (the server stopped): stop too
            self.cancel.set()

    async def batch(self) -> list[Any]:
        """Every item emitted since the last batch (waiting for one at least). A client
        that reads slowly gets several tokens per chunk instead of falling behind."""
        while True:
            await self._ready.wait()
            with self._lock:
                self._ready.clear()
                self._woken = False
                items = list(self._items)
                self._items.clear()
            if items:
                self.ended = items[-1] is END
                return items

    async def rest(self, head: list[Any]) -> list[Any]:
        """`head` and every item after it, up to and including `END`."""
        items = list(head)
        while not items or items[-1] is not END:
            items += await self.batch()
        return items


class Worker:
    """The one thread that uses the engine: runs jobs in order, one at a time."""

    def __init__(
        self, max_waiting: int = DEFAULT_MAX_WAITING, log: Callable[[str], None] = print
    ) -> None:
        self.max_waiting = max_waiting
        self._log = log
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.admitted = 0  # submitted and not finished: the running one and those waiting
        self.running: Job | None = None
        self._seconds = 5.0  # a running mean of job times, for Retry-After
        self._thread = threading.Thread(target=self._run, name="qwenrun-engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Job], None]) -> Job:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.admitted > self.max_waiting:  # one generating, max_waiting waiting
                retry = max(1, min(120, math.ceil(self._seconds * self.admitted)))
                raise Busy(self.waiting, retry)
            self.admitted += 1
            job = Job(fn, loop)
            self._jobs.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self.admitted - (self.running is not None)

    def cancel_all(self) -> None:
        """Stop the running job and every waiting one (the server is stopping)."""
        with self._lock:
            pending = list(self._jobs.queue)
            running = self.running
        for job in [*pending, running]:
            if job is not None:
                job.stopped = True  # before the cancel: whoever sees the cancel sees this
                job.cancel.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.running = job
            t0 = time.monotonic()
            try:
                if not job.cancel.is_set():  # a client that left while queued costs nothing
                    job.fn(job)
            except BaseException as exc:
                if not isinstance(exc, errors.QwenrunError | RequestError):
                    self._log("error: a request failed inside the server:\n" + trace(exc))
                job.error = exc
            finally:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - t0)
                with self._lock:
                    self.running = None
                    self.admitted -= 1
                job.emit(END)


def trace(exc: BaseException) -> str:
    """An exception's traceback as text, for the server's log."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
