"""The server's request handlers, one per endpoint, over one `ServerState`.

Contract: `Endpoints(state).routes()` are the routes: `GET /health` (200 when ready, else 503
with the status), `GET /v1/models[/{id}]` (OpenAI's model card plus qwenrun's own fields: the
model's info, busy, waiting, uptime; 404 for another id), `POST /v1/chat/completions` and
`POST /v1/completions` (also without `/v1`, as llama-server accepts them), and llama-server's
`POST /tokenize`. A body is read with the state's size limit (413 beyond it) and must be JSON
(400; also for one nested too deeply for the decoder), its text checked by `protocol` (how
much was not valid Unicode goes into the log line). A generation is a job on the state's
worker; the handler waits until its prompt is accepted (rendered, tokenized, within the
context) or refused, so every request error has its own status and body, then answers with a
stream (`replies.*_stream` in an `sse.EventStream`) or a whole body. A client that goes away
while its request waits or generates cancels the job (499 in the log); one cut off by a
stopping server is a 503 (`apierror.stopping`), or, streamed, ends with an error event.
Failures are raised (`ApiError`, `RequestError`, qwenrun errors) for the app's exception
handlers to answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qwenrun.serve import protocol, runner
from qwenrun.serve.apierror import ApiError, error_for, stopping, too_large
from qwenrun.serve.enginethread import END, Job
from qwenrun.serve.replies import (
    Meta,
    chat_stream,
    chat_whole,
    note_finished,
    text_stream,
    text_whole,
)
from qwenrun.serve.runner import Accepted, Finished, ServedModel
from qwenrun.serve.sse import EventStream, until_disconnect
from qwenrun.serve.state import ServerState


class Endpoints:
    """The handlers, bound to the server's state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        routes = []
        for prefix in ("/v1", ""):
            routes += [
                Route(f"{prefix}/models", self.models, methods=["GET"]),
                Route(f"{prefix}/models/{{model_id:path}}", self.model, methods=["GET"]),
                Route(f"{prefix}/chat/completions", self.chat_completions, methods=["POST"]),
                Route(f"{prefix}/completions", self.completions, methods=["POST"]),
            ]
        routes.append(Route("/health", self.health, methods=["GET"]))
        routes.append(Route("/tokenize", self.tokenize, methods=["POST"]))
        return routes

    async def health(self, request: Request) -> Response:
        state = self.state
        body = {"status": state.status, "model": state.model_id}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    def model_card(self) -> dict[str, Any]:
        state = self.state
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

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        model_id = self.state.model_id
        if request.path_params["model_id"] != model_id:
            raise ApiError(
                404,
                f"no model {request.path_params['model_id']!r} here: this server runs {model_id!r}",
                "not_found_error",
                code="model_not_found",
            )
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: Request) -> Response:
        state = self.state
        req = protocol.parse_chat(await read_json(request, state.max_body))
        note_replaced(request, req.replaced)
        served = state.require_model()
        job = state.worker.submit(lambda j: runner.run_chat(served, req, j.cancel, j.emit))
        return await _respond(request, job, served, chat_stream, chat_whole, req)

    async def completions(self, request: Request) -> Response:
        state = self.state
        req = protocol.parse_completion(await read_json(request, state.max_body))
        note_replaced(request, req.replaced)
        served = state.require_model()
        job = state.worker.submit(lambda j: runner.run_completion(served, req, j.cancel, j.emit))
        return await _respond(request, job, served, text_stream, text_whole, req)

    async def tokenize(self, request: Request) -> Response:
        # llama-server's endpoint: what `chat --server` needs for /stats' context use.
        state = self.state
        req = protocol.parse_tokenize(await read_json(request, state.max_body))
        note_replaced(request, req.replaced)
        served = state.require_model()
        tokens: list[int] = []
        text = req.content
        job = state.worker.submit(lambda j: tokens.extend(runner.run_tokenize(served, text)))
        await job.rest([])
        if job.error is not None:
            raise error_for(job.error)
        if job.stopped:  # still waiting when the server stopped: no tokens were counted
            raise stopping()
        return JSONResponse({"tokens": tokens})


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read with a size limit (a chunked body has no Content-Length).

    Bytes that are not UTF-8 are kept as lone surrogates, as Python reads stdin, so that
    `protocol` decides about them by the one rule (`text.clean`) with JSON's `\\ud800`
    escapes, instead of the whole request failing here for one stray byte."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw.decode(json.detect_encoding(raw), "surrogateescape"))
    except RecursionError:
        # Python's decoder recurses per level: "[" * 100000 must be a 400, not a crash.
        raise ApiError(
            400,
            f"the request body nests objects and arrays more than {protocol.MAX_DEPTH} levels deep",
        ) from None
    except ValueError as exc:  # JSONDecodeError, a number over Python's digit limit, …
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def note_replaced(request: Request, replaced: int) -> None:
    """For the request's log line: how much of its text was not valid Unicode."""
    if replaced:
        request.scope["state"]["qwenrun_replaced"] = replaced


async def _respond(
    request: Request,
    job: Job,
    served: ServedModel,
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
    meta = Meta.new(served.id, req)
    if req.stream:
        return EventStream(streamer(job, head, meta, note), lambda: _finish(job, note))
    items = await _or_disconnect(request, job, job.rest(head))
    if items is None:
        return Response(status_code=499)
    if job.error is not None:
        raise error_for(job.error)
    if job.stopped:
        # Cut off by a stopping server: a 503 while the client is still there to read it,
        # never a 200 that looks like a whole answer.
        for item in items:
            if isinstance(item, Finished):
                note_finished(note, item, job)
        raise stopping(cut=True)
    return JSONResponse(whole(items, meta, note))


async def _or_disconnect(request: Request, job: Job, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None (and the job cancelled) if the client goes first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        job.cancel.set()
        task.cancel()
        return None
    return task.result()


async def _first(job: Job) -> tuple[list[Any], BaseException | None]:
    """Items up to `Accepted` and any that came with it, or the error before it."""
    head: list[Any] = []
    while True:
        batch = await job.batch()
        head += batch
        for item in batch:
            if item is END:
                if job.error is None and job.stopped:  # still waiting when the server stopped
                    return head, stopping()
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
        for item in await job.rest([]):
            if isinstance(item, Finished):
                note_finished(note, item, job)
