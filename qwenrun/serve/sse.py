"""The streaming writer: server-sent events out of a job's stream, stopped when the client goes.

Contract: `EventStream(chunks, on_close)` is a `text/event-stream` response that sends the
byte chunks it is given and watches for the client's disconnect for the whole stream (not
only at the next write, whatever the ASGI server's spec version); when the client leaves or
the stream ends it closes the chunk iterator and then awaits `on_close`, shielded from
cancellation. `stream_items(job, head)` yields a job's output items in batches, at most one
batch per `STREAM_INTERVAL_S` (a fast model's tokens share chunks), without holding back the
last ones. `sse(doc)` is one event's bytes, `SSE_DONE` OpenAI's last one. `until_disconnect`
returns when the client has gone (once the request body has been read).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from qwenrun.serve.enginethread import END, Job
from qwenrun.serve.runner import Output

# At most this many chunks a second: faster than anyone reads, and a fast model's tokens
# then share chunks instead of costing a chunk (JSON, a write, the client's parse) each.
STREAM_INTERVAL_S = 0.01

SSE_DONE = b"data: [DONE]\n\n"


def sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def until_disconnect(receive: Receive) -> None:
    # The body is read by now, so the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


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
                    await until_disconnect(receive)
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


def _outputs(items: Sequence[Any]) -> list[Output]:
    """A batch's output items, without the stream's `END`."""
    return [i for i in items if i is not END]


async def stream_items(job: Job, head: list[Any]) -> AsyncIterator[list[Output]]:
    """Batches of output items until the job ends (the head first)."""
    batch = head
    sent = 0.0
    while True:
        done = bool(batch) and batch[-1] is END
        out = _outputs(batch)
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
