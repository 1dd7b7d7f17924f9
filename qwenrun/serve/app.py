"""The HTTP side of `qwenrun serve`: a Starlette app in front of one model on one engine thread.

Contract: `build_app(state)` returns the ASGI app over a `state.ServerState`: the endpoints'
routes (`endpoints.py`: `GET /health`, `GET /v1/models[/{id}]`, `POST /v1/chat/completions`,
`POST /v1/completions`, also without the `/v1` prefix, and `POST /tokenize`), the exception
handlers, and `Guard` around every request.

- One request generates at a time, on the worker's thread (`enginethread.py`: the engine is not
  thread-safe); up to `max_waiting` more wait in order; beyond that, 503 with `Retry-After`.
- A request waits for the prompt to be accepted (rendered, tokenized, within the context)
  before its response starts, so every request error has its own status and body.
- A client that goes away (while queued, during the prompt or mid-stream) cancels its
  generation: the engine stops at its next token or batch.
- Errors are OpenAI's JSON shape with the right status (`apierror.error_for`): 400 (bad
  request, context overflow with the numbers), 401 (API key, compared in constant time;
  `/health` needs none), 404, 405, 413 (body over `max_body` bytes), 503 (loading, busy,
  stopping), 500 without details (the traceback goes to the server's log once, never into a
  response).
- One log line per request (`log`): client, method, path, status, time, and for generations
  the tokens and speed and how the answer ended (a stopping server's cut says so); how many
  characters of the request were not valid Unicode, when some were.
"""

from __future__ import annotations

import hmac
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenrun import errors, text
from qwenrun.serve.apierror import ApiError, error_for, too_large
from qwenrun.serve.endpoints import Endpoints
from qwenrun.serve.enginethread import Busy, trace
from qwenrun.serve.protocol import RequestError
from qwenrun.serve.state import ServerState


def build_app(state: ServerState) -> Starlette:
    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {path}").response()
        return ApiError(exc.status_code, f"no such endpoint: {path}", "not_found_error").response()

    async def api_error(request: Request, exc: Exception) -> Response:
        return error_for(exc).response()

    app = Starlette(
        routes=Endpoints(state).routes(),
        exception_handlers={
            HTTPException: not_found,
            ApiError: api_error,
            RequestError: api_error,
            Busy: api_error,
            errors.QwenrunError: api_error,
            # Anything else is a bug, answered by `Guard`: inside it, so that the log line
            # has the 500 and the traceback is logged once (Starlette's outer handler would
            # also re-raise it to uvicorn, which logs it again).
        },
    )
    app.add_middleware(Guard, state=state)
    return app


# --------------------------------------------------------------------------------------
# Around every request: log line, API key, body size


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
        except Exception as exc:
            self.state.log("error: a request failed inside the server:\n" + trace(exc))
            if not status[0]:
                await error_for(exc).response()(scope, receive, send_logged)
            # A response already begun (a stream) cannot turn into an error: returning
            # without its end makes the server close the connection, which clients see
            # as a cut answer, never as a complete one.
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
            return too_large(self.state.max_body)
        return None

    def _log_line(self, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        notes = [scope["state"].get("qwenrun_note", "")]
        replaced = scope["state"].get("qwenrun_replaced", 0)
        if replaced:
            notes.append(text.notice(replaced, "the request").removeprefix("note: "))
        status_text = str(status) if status else "dropped"  # the client left before an answer
        line = f"{client[0]} {scope.get('method', '')} {scope.get('path', '')} {status_text}"
        line += f" {seconds:.2f} s" + "".join(f" · {note}" for note in notes if note)
        self.state.log(line)
