"""A generation's outputs as OpenAI's responses: streamed chunks or one whole body.

Contract: for `/v1/chat/completions`, `chat_stream(job, head, meta, note)` yields the SSE
bytes of a streamed answer (the role first, then reasoning and content deltas, consecutive
pieces of one kind in one delta, tool calls as OpenAI streams them, the finish chunk with
llama-server's `timings`, the usage chunk when asked for, `[DONE]`) and `chat_whole(items,
meta, note)` builds the whole `chat.completion`; `text_stream` and `text_whole` do the same for
`/v1/completions`. Each writes the generation's numbers into `note` (the request's log line).
A stream whose client left ends without a finish chunk (nobody reads it); one cut because
the server is stopping (`job.stopped`) and one that failed after it began end with an error
event (`{"error": {...}}`, which the `openai` client raises as an `APIError`) and no `[DONE]`,
so that no client takes the cut answer for a whole one. `Meta` is a response's id, time,
model and whether usage is wanted.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun.chat import AnswerText, ThinkingDone, ThinkingText
from qwenrun.serve import protocol
from qwenrun.serve.apierror import error_for, stopping
from qwenrun.serve.enginethread import Job
from qwenrun.serve.runner import Finished, ToolCallDelta
from qwenrun.serve.sse import SSE_DONE, sse, stream_items
from qwenrun.serve.toolcalls import tool_call_to_openai


@dataclass(frozen=True)
class Meta:
    rid: str
    created: int
    model: str
    include_usage: bool

    @classmethod
    def new(cls, model: str, req: Any) -> Meta:
        prefix = "chatcmpl-" if isinstance(req, protocol.ChatRequest) else "cmpl-"
        return cls(prefix + secrets.token_hex(12), protocol.now(), model, req.include_usage)


def note_finished(note: dict[str, Any], fin: Finished, job: Job | None = None) -> None:
    """The generation's part of the request's log line."""
    u, t = fin.usage, fin.timings
    cached = u["prompt_tokens_details"]["cached_tokens"]
    text = f"{u['prompt_tokens']} prompt ({cached} cached) → {u['completion_tokens']} tokens"
    if t.get("predicted_per_second"):
        text += f", {t['predicted_per_second']:.1f} tok/s"
    cut = fin.finish_reason == "cancelled" and job is not None and job.stopped
    text += ", cut off: the server is stopping" if cut else f", {fin.finish_reason}"
    note["qwenrun_note"] = text


def cut_event(job: Job) -> bytes:
    """The last event of a stream the server cut or that failed: OpenAI's error object."""
    err = stopping(cut=True) if job.error is None else error_for(job.error)
    return sse(protocol.error_body(err.message, err.kind, code=err.code))


class ChatChunks:
    """A batch of outputs as SSE chunks; consecutive pieces of one kind go out as one delta."""

    def __init__(self, meta: Meta) -> None:
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
        elif self._kind.startswith("arguments:"):  # one call's argument pieces, joined
            index = int(self._kind.removeprefix("arguments:"))
            self.chunk(protocol.tool_call_deltas(index, "", "", text)[1])
        else:
            self.chunk({"content": text}, **self._take_thinking())

    def thinking_end(self, item: ThinkingDone) -> None:
        self.flush()
        self._thinking = {"seconds": item.seconds, "tokens": item.tokens}

    def call(self, item: ToolCallDelta) -> None:
        """A tool call as it is written: its id and name at once, its argument pieces joined
        like text."""
        if item.id:
            self.flush()
            first = protocol.tool_call_deltas(item.index, item.id, item.name, "")[0]
            self.chunk(first, **self._take_thinking())
        if item.arguments:
            self.text(f"arguments:{item.index}", item.arguments)

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
    job: Job, head: list[Any], meta: Meta, note: dict[str, Any]
) -> AsyncIterator[bytes]:
    out = ChatChunks(meta)
    out.chunk({"role": "assistant", "content": ""})
    async for batch in stream_items(job, head):
        for item in batch:
            if isinstance(item, ThinkingText):
                out.text("reasoning", item.text)
            elif isinstance(item, AnswerText):
                out.text("content", item.text)
            elif isinstance(item, ThinkingDone):
                out.thinking_end(item)
            elif isinstance(item, ToolCallDelta):
                out.call(item)
            elif isinstance(item, Finished):
                note_finished(note, item, job)
                if item.finish_reason == "cancelled":
                    if job.stopped:  # what was generated, then the cut said as such
                        yield out.take() + cut_event(job)
                    return  # the client left: nobody to tell
                out.finish(item)
        data = out.take()
        if data:
            yield data
    if job.error is not None:
        # Failed after the stream began: OpenAI-style clients read an error event.
        yield cut_event(job)


def chat_whole(items: Sequence[Any], meta: Meta, note: dict[str, Any]) -> dict[str, Any]:
    fin = next(i for i in items if isinstance(i, Finished))
    note_finished(note, fin)
    calls = [tool_call_to_openai(c) for c in fin.tool_calls]
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
    job: Job, head: list[Any], meta: Meta, note: dict[str, Any]
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

    async for batch in stream_items(job, head):
        text = "".join(i.text for i in batch if isinstance(i, AnswerText))
        parts = [chunk(text)] if text else []
        for item in batch:
            if isinstance(item, Finished):
                note_finished(note, item, job)
                if item.finish_reason == "cancelled":
                    if job.stopped:
                        yield b"".join(parts) + cut_event(job)
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
        yield cut_event(job)


def text_whole(items: Sequence[Any], meta: Meta, note: dict[str, Any]) -> dict[str, Any]:
    fin = next(i for i in items if isinstance(i, Finished))
    note_finished(note, fin)
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
