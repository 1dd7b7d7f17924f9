"""How the server answers a failure: a status and OpenAI's error body, never a traceback.

Contract: `ApiError` is an error response (status, OpenAI error type and code, the parameter
at fault, extra headers such as `Retry-After`); `error_for(exc)` is the one mapping from
anything a request can raise to one: an `ApiError` as it is, a `RequestError` a 400 naming
the parameter, a context overflow a 400 with code `context_length_exceeded`, any other
`UsageError` a 400, the worker's `Busy` a 503 with `Retry-After`, any other qwenrun error a
500 with its message, and anything else a 500 that says only to see the server's log.
`stopping(cut)` is a stopping server's 503 (code `server_stopping`): for a request it will
not start, or one whose answer it cut off.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from qwenrun import errors
from qwenrun.serve import protocol
from qwenrun.serve.enginethread import Busy
from qwenrun.serve.protocol import RequestError


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
    if isinstance(exc, Busy):
        return ApiError(
            503,
            f"the server is busy: {exc.waiting} requests are waiting for the model",
            "unavailable_error",
            code="server_busy",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, errors.ContextOverflowError):
        return ApiError(400, exc.message, param="messages", code="context_length_exceeded")
    if isinstance(exc, errors.UsageError):
        return ApiError(400, exc.message)
    if isinstance(exc, errors.QwenrunError):
        return ApiError(500, exc.message, "server_error")
    return ApiError(500, "internal error: see the server's log", "server_error")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than this server accepts ({limit:,} bytes)",
        code="request_too_large",
    )


def stopping(*, cut: bool = False) -> ApiError:
    """A stopping server's answer to a request it will not start, or whose answer it cut."""
    message = (
        "the server stopped before the answer was complete"
        if cut
        else "the server is stopping; the request was not started"
    )
    return ApiError(503, message, "unavailable_error", code="server_stopping")
