"""The HTTP side of `qwenrun serve`: a Starlette app in front of one model on one engine thread.

Contract: `build_app(state)` returns the ASGI app; `ServerState` holds the model (loading,
ready or failed), the `Worker` that owns the engine, the API key and the limits. Endpoints:
`GET /health`, `GET /v1/models[/{id}]`, `POST /v1/chat/completions`, `POST /v1/completions`
(also without the `/v1` prefix, as llama-server accepts them).

- One request generates at a time, on the worker's thread (the engine is not thread-safe);
  up to `max_waiting` more wait in order; beyond that, 503 with `Retry-After`.
- A request waits for the prompt to be accepted (rendered, tokenized, within the context)
  before its response starts, so every request error has its own status and body.
- A client that goes away (while queued, during the prompt or mid-stream) cancels its
  generation: the engine stops at its next token or batch.
- Errors are OpenAI's JSON shape with the right status: 400 (bad request, context overflow
  with the numbers), 401 (API key, compared in constant time; `/health` needs none), 404, 405,
  413 (body over `max_body` bytes), 503 (loading, busy, stopping), 500 without details (the
  traceback goes to the server's log, never into a response).
- One log line per request (`log`): client, method, path, status, time, and for generations
  the tokens and speed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import math
import queue
import secrets
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenrun import errors
from qwenrun.chat import AnswerText, ThinkingDone, ThinkingText
from qwenrun.serve import protocol, runner
from qwenrun.serve.protocol import RequestError
from qwenrun.serve.runner import Accepted, Finished, Output, ServedModel, ToolCallOut

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a full 256K-token context is a few MB of text
DEFAULT_MAX_WAITING = 8


class ApiError(Exception):
    """An error response: status, OpenAI error type and code, and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers or {}

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.kind, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_for(exc: BaseException) -> ApiError:
    """What a failed request answers: a status and a message in OpenAI's shape."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, errors.ContextOverflowError):
        return ApiError(400, exc.message, param="messages", code="context_length_exceeded")
    if isinstance(exc, errors.UsageError):
        return ApiError(400, exc.message)
    if isinstance(exc, errors.QwenrunError):
        return ApiError(500, exc.message, "server_error")
    return ApiError(500, "internal error: see the server's log", "server_error")


# --------------------------------------------------------------------------------------
# The engine's thread and its queue


_END = object()  # the last item of a job's stream


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
        self.ended = False  # its last item was read
        self.over = asyncio.Event()  # its last item was emitted

    def emit(self, item: Any) -> None:
        if item is _END:
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
                self.ended = items[-1] is _END
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
                raise ApiError(
                    503,
                    f"the server is busy: {self.waiting} requests are waiting for the model",
                    "unavailable_error",
                    code="server_busy",
                    headers={"Retry-After": str(retry)},
                )
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
                    self._log("error: a request failed inside the server:\n" + _trace(exc))
                job.error = exc
            finally:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - t0)
                with self._lock:
                    self.running = None
                    self.admitted -= 1
                job.emit(_END)


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


# --------------------------------------------------------------------------------------
# The server's state


@dataclass
class ServerState:
    model_id: str
    worker: Worker
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    log: Callable[[str], None] = print
    status: Literal["loading", "ready", "failed", "stopping"] = "loading"
    model: ServedModel | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def ready(self, model: ServedModel) -> None:
        self.model, self.model_id, self.status = model, model.id, "ready"

    def require_model(self) -> ServedModel:
        if self.status == "ready" and self.model is not None:
            return self.model
        if self.status == "loading":
            raise ApiError(
                503,
                "the model is loading; try again shortly",
                "unavailable_error",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        raise ApiError(503, "the server is stopping", "unavailable_error", code="unavailable")


# --------------------------------------------------------------------------------------
# Middleware: log line, API key, body size


class Guard:
    """Around every request: the API key, the declared body size, and the log line."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = [0]
        scope.setdefault("state", {})

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            self._log_line(scope, status[0], time.monotonic() - t0)

    def _refuse(self, scope: Scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self._key is not None and path != "/health":
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            # Constant time: how much of a guess matched must not show in the timing.
            if not hmac.compare_digest(token, self._key):
                return ApiError(
                    401,
                    "missing or wrong API key: send it as Authorization: Bearer KEY",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.state.max_body:
            return _too_large(self.state.max_body)
        return None

    def _log_line(self, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        note = scope["state"].get("qwenrun_note", "")
        status_text = str(status) if status else "dropped"  # the client left before an answer
        line = f"{client[0]} {scope.get('method', '')} {scope.get('path', '')} {status_text}"
        line += f" {seconds:.2f} s" + (f" · {note}" if note else "")
        self.state.log(line)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than this server accepts ({limit:,} bytes)",
        code="request_too_large",
    )


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read with a size limit (a chunked body has no Content-Length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def _until_disconnect(receive: Receive) -> None:
    # The body is read by now, so the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(request: Request, job: Job, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None (and the job cancelled) if the client goes first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        job.cancel.set()
        task.cancel()
        return None
    return task.result()


# --------------------------------------------------------------------------------------
# Server-sent events


class EventStream(Response):
    """A `text/event-stream` response that stops (and calls `on_close`) when the client
    leaves, whatever the ASGI server's spec version: a disconnect is watched for the whole
    stream, not only noticed at the next write."""

    media_type = "text/event-stream"

    def __init__(
        self, chunks: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            await _aclose(self.chunks)
            with anyio.CancelScope(shield=True):
                await self.on_close()


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------
# Endpoints


def build_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        body = {"status": state.status, "model": state.model_id}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": state.model_id,
            "object": "model",
            "created": state.model.created if state.model else int(state.started),
            "owned_by": "qwenrun",
        }
        info: dict[str, Any] = {"status": state.status}
        if state.model is not None:
            info.update(state.model.info())
        worker = state.worker
        info["busy"] = worker.running is not None
        info["waiting"] = worker.waiting
        info["uptime_s"] = round(time.time() - state.started, 1)
        card["qwenrun"] = info
        return card

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model_id"] != state.model_id:
            raise ApiError(
                404,
                f"no model {request.path_params['model_id']!r} here: this server runs "
                f"{state.model_id!r}",
                "not_found_error",
                code="model_not_found",
            )
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        req = protocol.parse_chat(await read_json(request, state.max_body))
        served = state.require_model()
        job = state.worker.submit(lambda j: runner.run_chat(served, req, j.cancel, j.emit))
        return await _respond(request, job, served, req.stream, chat_stream, chat_whole, req)

    async def completions(request: Request) -> Response:
        req = protocol.parse_completion(await read_json(request, state.max_body))
        served = state.require_model()
        job = state.worker.submit(lambda j: runner.run_completion(served, req, j.cancel, j.emit))
        return await _respond(request, job, served, req.stream, text_stream, text_whole, req)

    async def _respond(
        request: Request,
        job: Job,
        served: ServedModel,
        stream: bool,
        streamer: Callable[..., AsyncIterator[bytes]],
        whole: Callable[..., dict[str, Any]],
        req: Any,
    ) -> Response:
        # Wait until the prompt is accepted (or refused): only then is the status known.
        first = await _or_disconnect(request, job, _first(job))
        if first is None:
            return Response(status_code=499)  # nobody is there to read it
        head, error = first
        if error is not None:
            raise error_for(error)
        note = request.scope["state"]
        meta = _Meta.new(served.id, req)
        if stream:
            return EventStream(streamer(job, head, meta, note), lambda: _finish(job, note))
        items = await _or_disconnect(request, job, _rest(job, head))
        if items is None:
            return Response(status_code=499)
        if job.error is not None:
            raise error_for(job.error)
        return JSONResponse(whole(items, meta, note))

    async def tokenize(request: Request) -> Response:
        # llama-server's endpoint: what `chat --server` needs for /stats' context use.
        body = await read_json(request, state.max_body)
        text = body.get("content") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "content must be a string", param="content")
        served = state.require_model()
        tokens: list[int] = []
        job = state.worker.submit(lambda j: tokens.extend(runner.run_tokenize(served, text)))
        await _rest(job, [])
        if job.error is not None:
            raise error_for(job.error)
        return JSONResponse({"tokens": tokens})

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {path}").response()
        return ApiError(exc.status_code, f"no such endpoint: {path}", "not_found_error").response()

    async def api_error(request: Request, exc: Exception) -> Response:
        return error_for(exc).response()

    async def crash(request: Request, exc: Exception) -> Response:
        state.log("error: a request failed inside the server:\n" + _trace(exc))
        return error_for(exc).response()

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/models/{{model_id:path}}", model, methods=["GET"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", completions, methods=["POST"]),
        ]
    routes.append(Route("/health", health, methods=["GET"]))
    routes.append(Route("/tokenize", tokenize, methods=["POST"]))
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: not_found,
            ApiError: api_error,
            RequestError: api_error,
            errors.QwenrunError: api_error,
            Exception: crash,
        },
    )
    app.add_middleware(Guard, state=state)
    return app


async def _first(job: Job) -> tuple[list[Any], BaseException | None]:
    """Items up to `Accepted` and any that came with it, or the error before it."""
    head: list[Any] = []
    while True:
        batch = await job.batch()
        head += batch
        for item in batch:
            if item is _END:
                return head, job.error or RuntimeError("the request ended without an answer")
            if isinstance(item, Accepted):
                return head, None


async def _finish(job: Job, note: dict[str, Any]) -> None:
    """After a stream: a client that left stops its generation; the log line then gets the
    numbers of what was generated (the engine stops at its next token)."""
    job.cancel.set()
    if job.ended:
        return  # the stream ran to its end
    with anyio.move_on_after(30):
        for item in await _rest(job, []):
            if isinstance(item, Finished):
                _note(note, item)


async def _rest(job: Job, head: list[Any]) -> list[Any]:
    items = list(head)
    while not items or items[-1] is not _END:
        items += await job.batch()
    return items


@dataclass(frozen=True)
class _Meta:
    rid: str
    created: int
    model: str
    include_usage: bool

    @classmethod
    def new(cls, model: str, req: Any) -> _Meta:
        prefix = "chatcmpl-" if isinstance(req, protocol.ChatRequest) else "cmpl-"
        return cls(prefix + secrets.token_hex(12), protocol.now(), model, req.include_usage)


def _note(note: dict[str, Any], fin: Finished) -> None:
    """The generation's part of the request's log line."""
    u, t = fin.usage, fin.timings
    cached = u["prompt_tokens_details"]["cached_tokens"]
    text = f"{u['prompt_tokens']} prompt ({cached} cached) → {u['completion_tokens']} tokens"
    if t.get("predicted_per_second"):
        text += f", {t['predicted_per_second']:.1f} tok/s"
    text += f", {fin.finish_reason}"
    note["qwenrun_note"] = text


def _items(items: Sequence[Any]) -> list[Output]:
    return [i for i in items if i is not _END]


# At most this many chunks a second: faster than anyone reads, and a fast model's tokens
# then share chunks instead of costing a chunk (JSON, a write, the client's parse) each.
STREAM_INTERVAL_S = 0.01


async def _stream_items(job: Job, head: list[Any]) -> AsyncIterator[list[Output]]:
    """Batches of output items until the job ends (the head first)."""
    batch = head
    sent = 0.0
    while True:
        done = bool(batch) and batch[-1] is _END
        out = _items(batch)
        if out:
            yield out
            sent = time.monotonic()
        if done:
            return
        pause = sent + STREAM_INTERVAL_S - time.monotonic()
        if pause > 0 and not job.over.is_set():
            # The pause ends early when the job does: its last tokens are not held back.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.over.wait(), pause)
        batch = await job.batch()


class _ChatChunks:
    """A batch of outputs as SSE chunks; consecutive pieces of one kind go out as one delta."""

    def __init__(self, meta: _Meta) -> None:
        self.meta = meta
        self.parts: list[bytes] = []
        self._kind = ""
        self._texts: list[str] = []
        # qwenrun's own field, on the chunk after thinking ends: how long it took (the
        # `--server` client's "Thought for …" line). Other clients ignore it.
        self._thinking: dict[str, Any] = {}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
        meta = self.meta
        doc = protocol.chat_chunk(meta.rid, meta.created, meta.model, delta, finish, **extra)
        self.parts.append(sse(doc))

    def text(self, kind: str, text: str) -> None:
        if kind != self._kind:
            self.flush()
            self._kind = kind
        self._texts.append(text)

    def flush(self) -> None:
        if not self._texts:
            return
        text = "".join(self._texts)
        self._texts.clear()
        if self._kind == "reasoning":
            self.chunk(protocol.reasoning_delta(text))
        else:
            self.chunk({"content": text}, **self._take_thinking())

    def thinking_end(self, item: ThinkingDone) -> None:
        self.flush()
        self._thinking = {"seconds": item.seconds, "tokens": item.tokens}

    def call(self, item: ToolCallOut) -> None:
        self.flush()
        deltas = protocol.tool_call_deltas(item.index, item.id, item.name, item.arguments)
        self.chunk(deltas[0], **self._take_thinking())
        self.chunk(deltas[1])

    def finish(self, item: Finished) -> None:
        self.flush()
        self.chunk({}, item.finish_reason, timings=item.timings, **self._take_thinking())
        if self.meta.include_usage:
            meta = self.meta
            doc = protocol.chat_chunk(meta.rid, meta.created, meta.model, {})
            doc["choices"] = []
            doc["usage"] = item.usage
            self.parts.append(sse(doc))
        self.parts.append(SSE_DONE)

    def take(self) -> bytes:
        self.flush()
        out = b"".join(self.parts)
        self.parts.clear()
        return out

    def _take_thinking(self) -> dict[str, Any]:
        thinking, self._thinking = self._thinking, {}
        return {"thinking": thinking} if thinking else {}


async def chat_stream(
    job: Job, head: list[Any], meta: _Meta, note: dict[str, Any]
) -> AsyncIterator[bytes]:
    out = _ChatChunks(meta)
    out.chunk({"role": "assistant", "content": ""})
    async for batch in _stream_items(job, head):
        for item in batch:
            if isinstance(item, ThinkingText):
                out.text("reasoning", item.text)
            elif isinstance(item, AnswerText):
                out.text("content", item.text)
            elif isinstance(item, ThinkingDone):
                out.thinking_end(item)
            elif isinstance(item, ToolCallOut):
                out.call(item)
            elif isinstance(item, Finished):
                _note(note, item)
                if item.finish_reason == "cancelled":
                    return  # the client left, or the server is stopping: no proper end
                out.finish(item)
        data = out.take()
        if data:
            yield data
    if job.error is not None:
        # Failed after the stream began: OpenAI-style clients read an error event.
        err = error_for(job.error)
        yield sse(protocol.error_body(err.message, err.kind, code=err.code))


def chat_whole(items: Sequence[Any], meta: _Meta, note: dict[str, Any]) -> dict[str, Any]:
    fin = next(i for i in items if isinstance(i, Finished))
    _note(note, fin)
    calls = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in fin.tool_calls
    ]
    ends = [i for i in items if isinstance(i, ThinkingDone)]
    doc = {
        "id": meta.rid,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": protocol.chat_message(fin.content, fin.reasoning, calls),
                "logprobs": None,
                "finish_reason": fin.finish_reason,
            }
        ],
        "usage": fin.usage,
        "timings": fin.timings,
    }
    if ends:
        doc["thinking"] = {"seconds": ends[-1].seconds, "tokens": ends[-1].tokens}
    return doc


async def text_stream(
    job: Job, head: list[Any], meta: _Meta, note: dict[str, Any]
) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        doc = {
            "id": meta.rid,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [choice],
            **extra,
        }
        return sse(doc)

    async for batch in _stream_items(job, head):
        text = "".join(i.text for i in batch if isinstance(i, AnswerText))
        parts = [chunk(text)] if text else []
        for item in batch:
            if isinstance(item, Finished):
                _note(note, item)
                if item.finish_reason == "cancelled":
                    return
                parts.append(chunk("", item.finish_reason, timings=item.timings))
                if meta.include_usage:
                    parts.append(
                        sse(
                            {
                                "id": meta.rid,
                                "object": "text_completion",
                                "created": meta.created,
                                "model": meta.model,
                                "choices": [],
                                "usage": item.usage,
                            }
                        )
                    )
                parts.append(SSE_DONE)
        if parts:
            yield b"".join(parts)
    if job.error is not None:
        err = error_for(job.error)
        yield sse(protocol.error_body(err.message, err.kind, code=err.code))


def text_whole(items: Sequence[Any], meta: _Meta, note: dict[str, Any]) -> dict[str, Any]:
    fin = next(i for i in items if isinstance(i, Finished))
    _note(note, fin)
    return {
        "id": meta.rid,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "text": fin.content, "logprobs": None, "finish_reason": fin.finish_reason}
        ],
        "usage": fin.usage,
        "timings": fin.timings,
    }
