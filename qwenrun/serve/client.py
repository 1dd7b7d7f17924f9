"""`run` and `chat` through a `qwenrun serve`: the same turns, the model loaded elsewhere.

Contract: `RemoteModel.connect(url)` asks a server what it runs (`GET /v1/models`, waiting while
it loads) and is then a `chat.TurnServer`: `chat.stream_turn(remote, conv, text)` sends the
conversation as one OpenAI chat completion (streamed, with the conversation's mode as
`chat_template_kwargs.enable_thinking`, its reasoning effort as `reasoning_effort`, its budget,
sampling settings and token cap) and yields the events a local turn yields: `ThinkingText`,
`ThinkingDone`, `AnswerText`, `TurnDone` with a `TurnResult` whose stats come from the server's
usage and timings (the time to first token is measured here: what the user waited). So the
renderers and the REPL show a remote turn as a local one. `conversation()` makes the
`chat.Conversation` with the server's template and presets; `tokenize` and `cache_report` answer
the REPL's `/stats` from the server; `check_model(MODEL)` refuses a MODEL that names another
model than the server runs. `list_models(url)` is `qwenrun ps`.

Only the standard library's `http.client` is used (no extra dependency for a client). A
server that is busy or loading is waited for; a missing one, a refused key, a bad request
and a context overflow become the `QwenrunError` a local run would raise, so exit codes are
the same. A server that stops mid-answer (its error event `server_stopping`, or a stream
that ends with neither a finish reason nor `[DONE]`) is a `BackendError` that says so, as a
server that is not there is: the answer is incomplete, and only the user's own Ctrl-C makes
a turn "cancelled". Ctrl-C (the turn's `cancel`) closes the connection at once, which makes
the server stop generating.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qwenrun import errors, sampling
from qwenrun.chat import (
    AnswerText,
    Conversation,
    Notice,
    ThinkingDone,
    ThinkingText,
    Turn,
    TurnDone,
    TurnEvent,
    TurnResult,
)
from qwenrun.engine.values import CacheReport, GenStats, SamplingParams
from qwenrun.template import ChatTemplate, ModelProfile, fallback_template

if TYPE_CHECKING:
    from qwenrun.catalog import ThinkingKind

DEFAULT_URL = "http://127.0.0.1:8080"
# What to do about a server that is not there: `run`/`chat --server` can do without one.
RUN_HINT = "start one: qwenrun serve MODEL (or leave --server out to load the model here)"
PS_HINT = "start one with qwenrun serve MODEL, or name yours with --server URL"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 3600.0  # a long prompt on a slow machine: minutes before the first byte
WAIT_FOR_SERVER_S = 900.0  # how long a client waits for a server that loads or is busy


def api_key_from_env() -> str | None:
    return os.environ.get("QWENRUN_API_KEY") or None


@dataclass(frozen=True)
class Endpoint:
    """Where the server is: scheme, host, port (from `http://host:port[/v1]` or `host:port`)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.UsageError(
                f"{url!r} is not a server address",
                hint="write http://HOST:PORT, e.g. " + DEFAULT_URL,
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise errors.UsageError(f"{url!r} has a bad port") from None
        return cls(parts.scheme, parts.hostname, port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)


class _Response:
    """A finished or streaming HTTP exchange: status, decoded error, the open response."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.resp = resp
        self.status = resp.status

    def json(self) -> Any:
        data = self.resp.read()
        self.conn.close()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None

    def close(self) -> None:
        # shutdown() first: close() alone would wait for a reader thread's recv to return.
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def _request(
    where: Endpoint,
    method: str,
    path: str,
    body: Any | None = None,
    *,
    api_key: str | None = None,
    timeout: float = READ_TIMEOUT_S,
    hint: str = RUN_HINT,
) -> _Response:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = where.connection(CONNECT_TIMEOUT_S)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.request(method, path, body=data, headers=headers)
        return _Response(conn, conn.getresponse())
    except (ConnectionRefusedError, socket.gaierror) as exc:
        conn.close()
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)
        raise errors.BackendError(
            f"no qwenrun server at {where.url}: {reason}", hint=hint
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise errors.BackendError(f"the server at {where.url} failed: {exc}") from None


def _raise_for(where: Endpoint, status: int, doc: Any) -> None:
    """The error a local run would raise for what the server answered."""
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    message = str(message or f"HTTP {status}")
    if status == 401:
        raise errors.UsageError(
            f"the server at {where.url} refused the API key: {message}",
            hint="set QWENRUN_API_KEY to the key the server was started with",
        )
    if status == 400 and code == "context_length_exceeded":
        raise errors.ContextOverflowError(
            message, hint="shorten it, or restart the server with a larger --ctx"
        )
    if status in (400, 413, 422):
        raise errors.UsageError(message)
    if code == "server_stopping":  # a request it did not start, or a whole answer it cut
        said = message.removeprefix("the server ")  # "is stopping; …", "stopped before …"
        raise errors.BackendError(
            f"the server at {where.url} {said}", hint="ask again once it is back"
        )
    if status == 404:
        raise errors.BackendError(
            f"{where.url} does not look like a qwenrun server: {message}",
            hint="check the address; qwenrun serve listens on " + DEFAULT_URL,
        )
    raise errors.BackendError(f"the server at {where.url} failed: {message}")


def _retry_after(resp: _Response) -> float:
    value = resp.resp.getheader("Retry-After") or "1"
    try:
        return min(10.0, max(0.2, float(value)))
    except ValueError:
        return 1.0


def _call(
    where: Endpoint,
    method: str,
    path: str,
    body: Any | None = None,
    *,
    api_key: str | None,
    wait_s: float = WAIT_FOR_SERVER_S,
) -> _Response:
    """A request that waits out a loading or busy server (503), then fails as a run would."""
    deadline = time.monotonic() + wait_s
    while True:
        resp = _request(where, method, path, body, api_key=api_key)
        if resp.status < 400:
            return resp
        doc = resp.json()
        err = doc.get("error") if isinstance(doc, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        waitable = code in ("model_loading", "server_busy")
        if resp.status == 503 and waitable and time.monotonic() < deadline:
            # What Retry-After asks for: the server says when to come back.
            time.sleep(_retry_after(resp))
            continue
        _raise_for(where, resp.status, doc)


def list_models(
    url: str, *, api_key: str | None = None, hint: str = PS_HINT
) -> list[dict[str, Any]]:
    """What a server runs (`GET /v1/models`), without waiting for it to finish loading.
    `hint` is what to do when no server is there (`qwenrun ps`'s by default)."""
    where = Endpoint.parse(url)
    key = api_key or api_key_from_env()
    resp = _request(where, "GET", "/v1/models", api_key=key, hint=hint)
    doc = resp.json()
    if resp.status >= 400:
        _raise_for(where, resp.status, doc)
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise errors.BackendError(f"{where.url} does not look like a qwenrun server")
    return [m for m in data if isinstance(m, dict)]


@dataclass
class _Stream:
    """A turn's SSE stream read on a thread, so that Ctrl-C can close it at once."""

    resp: _Response
    items: queue.Queue[Any] = field(default_factory=queue.Queue)
    done: bool = False  # the server's `[DONE]` came: the stream ended as it should

    def start(self) -> None:
        threading.Thread(target=self._read, name="qwenrun-sse", daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.resp.resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    break
                self.items.put(json.loads(payload))
        except Exception as exc:  # a cut connection or a broken event: the turn's to report
            self.items.put(exc)
        self.items.put(None)


class RemoteModel:
    """A model served by `qwenrun serve`, as `chat.stream_turn` drives it (`chat.TurnServer`)."""

    def __init__(self, where: Endpoint, card: Mapping[str, Any], api_key: str | None) -> None:
        self.where = where
        self.api_key = api_key
        self.id = str(card.get("id", ""))
        info = card.get("qwenrun")
        self.info: dict[str, Any] = dict(info) if isinstance(info, Mapping) else {}
        self._n_ctx = int(self.info.get("n_ctx") or 0)
        self._cached = 0

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None) -> RemoteModel:
        where = Endpoint.parse(url)
        key = api_key or api_key_from_env()
        deadline = time.monotonic() + WAIT_FOR_SERVER_S
        while True:
            models = list_models(where.url, api_key=key, hint=RUN_HINT)
            if not models:
                raise errors.BackendError(f"the server at {where.url} serves no model")
            card = models[0]
            status = (card.get("qwenrun") or {}).get("status", "ready")
            if status == "ready" or "qwenrun" not in card:
                return cls(where, card, key)
            if status != "loading" or time.monotonic() > deadline:
                raise errors.BackendError(f"the server at {where.url} is {status}")
            time.sleep(0.5)  # the model is still loading: ask again shortly

    # ---- what the REPL and the renderers ask of an engine

    @property
    def url(self) -> str:
        return self.where.url

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def cached_tokens(self) -> int:
        """Tokens the server's cache holds after this client's last turn (as it reported)."""
        return self._cached

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.id)

    def placement(self) -> dict[str, Any]:
        value = self.info.get("placement")
        return dict(value) if isinstance(value, Mapping) else {}

    def reasons(self) -> list[str]:
        """The server's own reasons for its model and plan (shown with --verbose; the facts
        of the start-up line are `ui.talk.remote_facts`')."""
        return [str(r) for r in self.info.get("reasons") or ()]

    def close(self) -> None:
        pass  # every turn has its own connection

    def tokenize(self, text: str) -> list[int]:
        """The server's tokens for `text` (the REPL's /stats counts the context with it)."""
        resp = _call(self.where, "POST", "/tokenize", {"content": text}, api_key=self.api_key)
        doc = resp.json()
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        return [int(t) for t in tokens] if isinstance(tokens, list) else []

    def cache_report(self) -> CacheReport:
        """What the server's engine keeps to avoid evaluating prompts again, as of now."""
        from qwenrun.engine.promptcache import DiskReport

        models = list_models(self.url, api_key=self.api_key)
        info = (models[0].get("qwenrun") or {}) if models else {}
        cache = dict(info.get("cache") or {})
        try:
            disk = cache.get("disk")
            cache["disk"] = DiskReport(**{**disk, "folder": Path(disk["folder"])}) if disk else None
            return CacheReport(**cache)
        except (TypeError, KeyError):  # a server of another version: nothing to show
            return CacheReport(False, 0, 0, 0, 0, None)

    # ---- the model and its conversation

    def profile(self) -> ModelProfile:
        presets = {
            mode: _preset(p)
            for mode, p in (self.info.get("presets") or {}).items()
            if isinstance(p, Mapping)
        }
        if not presets:
            from qwenrun.template import DEFAULT_PRESETS

            presets = dict(DEFAULT_PRESETS)
        kinds: dict[str, ThinkingKind] = {
            "hybrid": "hybrid",
            "thinking": "thinking",
            "direct": "direct",
        }
        thinking = kinds.get(str(self.info.get("thinking")), "hybrid")
        return ModelProfile(self.name, thinking, presets)

    def conversation(self, **kwargs: Any) -> Conversation:
        """A conversation with the server's model: its template and presets, the user's
        settings. The server renders the prompts; the template here is for the record."""
        source = self.info.get("chat_template") or fallback_template()
        return Conversation(ChatTemplate(str(source)), self.profile(), **kwargs)

    def check_model(self, asked: str | None) -> None:
        """Refuse a MODEL argument that names another model than the server runs: a script
        that asks for one model must not silently get another."""
        if asked is None or _same_model(asked, self.id, str(self.info.get("path", ""))):
            return
        raise errors.UsageError(
            f"the server at {self.url} runs {self.id}, not {asked}",
            hint=f"ask for {self.id}, or leave --server out to load {asked} here",
        )

    # ---- one turn

    def stream_turn(
        self, conv: Conversation, text: str, *, cancel: threading.Event | None = None
    ) -> Iterator[TurnEvent]:
        """One turn of `conv` on the server (see `chat.stream_turn`)."""
        t0 = time.monotonic()  # TTFT: what the user waits, request and queue included
        dropped = 0
        kept = list(conv.turns)
        while True:
            try:
                resp = _call(
                    self.where,
                    "POST",
                    "/v1/chat/completions",
                    self._body(conv, text),
                    api_key=self.api_key,
                )
                break
            except errors.ContextOverflowError:
                if not conv.turns:
                    conv.turns = kept  # a message that cannot fit must not cost the history
                    raise
                conv.turns.pop(0)  # as a local chat does: the oldest turns go first
                dropped += 1
        if dropped:
            yield Notice(
                f"Context full: dropped the oldest {dropped} turn"
                f"{'' if dropped == 1 else 's'} of the conversation."
            )
        yield from self._read_turn(conv, text, resp, dropped, cancel, t0)

    def _body(self, conv: Conversation, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.id,
            "messages": conv.messages(text),
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": conv.enable_thinking},
        }
        if conv.effort:
            body["reasoning_effort"] = conv.effort
        # Each setting under its first request field in the table; the server applies the
        # mode's preset under the sampler's.
        given = {**conv.settings, "max_tokens": conv.max_tokens, "budget": conv.budget}
        for s in sampling.SETTINGS:
            if given.get(s.field) is not None:
                body[s.server[0]] = given[s.field]
        return body

    def _read_turn(
        self,
        conv: Conversation,
        text: str,
        resp: _Response,
        dropped: int,
        cancel: threading.Event | None,
        t0: float,
    ) -> Iterator[TurnEvent]:
        mode = conv.mode
        stream = _Stream(resp)
        stream.start()
        thinking: list[str] = []
        answer: list[str] = []
        t_first = t_think = 0.0
        think_chunks = 0
        thinking_done: tuple[float, int] | None = None
        finish = "cancelled"
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        try:
            while True:
                try:
                    item = stream.items.get(timeout=0.1)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        break  # closing the connection stops the server's generation
                    continue
                if item is None:
                    break
                if isinstance(item, http.client.IncompleteRead | ConnectionError):
                    raise self._stopped()  # the connection closed mid-answer
                if isinstance(item, Exception):
                    raise errors.BackendError(f"the server at {self.url} cut the answer: {item}")
                if cancel is not None and cancel.is_set():
                    break
                if "error" in item and "choices" not in item:
                    err = item["error"] if isinstance(item["error"], dict) else {}
                    if err.get("code") == "server_stopping":
                        raise self._stopped()
                    raise errors.BackendError(
                        f"the server failed mid-answer: {err.get('message', item['error'])}"
                    )
                if isinstance(item.get("usage"), dict):
                    usage = item["usage"]
                if isinstance(item.get("timings"), dict):
                    timings = item["timings"]
                done = item.get("thinking")
                if isinstance(done, dict) and thinking and thinking_done is None:
                    thinking_done = (float(done.get("seconds", 0)), int(done.get("tokens", 0)))
                    yield ThinkingDone(*thinking_done)
                for choice in item.get("choices") or ():
                    delta = choice.get("delta") or {}
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:
                        if not t_first:
                            t_first = time.monotonic()
                        if not thinking:
                            t_think = time.monotonic()
                        thinking.append(reasoning)
                        think_chunks += 1
                        yield ThinkingText(reasoning)
                    content = delta.get("content")
                    if content:
                        if not t_first:
                            t_first = time.monotonic()
                        if thinking and thinking_done is None:
                            # A server that does not say how long it thought: measured here.
                            thinking_done = (time.monotonic() - t_think, think_chunks)
                            yield ThinkingDone(*thinking_done)
                        answer.append(content)
                        yield AnswerText(content)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
        finally:
            resp.close()
        if thinking and thinking_done is None:
            thinking_done = (time.monotonic() - t_think, think_chunks)
            yield ThinkingDone(*thinking_done)
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
        elif finish == "cancelled" and not stream.done:
            # Neither a finish reason nor `[DONE]`, and not the user's Ctrl-C: the server went
            # away mid-answer (killed, or one that does not say so): not a whole answer.
            raise self._stopped()
        if finish == "tool_calls":
            finish = "stop"
        stats = _stats(usage, timings, (t_first - t0) * 1000 if t_first else 0.0)
        if usage:
            self._cached = int(usage.get("total_tokens") or 0)
        result = TurnResult(
            answer="".join(answer),
            thinking="".join(thinking),
            finish_reason=finish,
            stats=stats,
            mode=mode,
            thinking_seconds=thinking_done[0] if thinking_done else 0.0,
            thinking_tokens=thinking_done[1] if thinking_done else 0,
            dropped_turns=dropped,
        )
        if finish != "cancelled" or answer or thinking:
            conv.add_turn(Turn(text, result.answer, result.thinking, mode, cut=result.cut))
        yield TurnDone(result)

    def _stopped(self) -> errors.BackendError:
        return errors.BackendError(
            f"the server at {self.url} stopped before the answer was complete",
            hint="ask again once it is back",
        )


def _preset(doc: Mapping[str, Any]) -> SamplingParams:
    """A mode's preset as the server's `/v1/models` card gives it: the sampler settings of
    the table it names (a server of another version may name fewer, or others)."""
    given: dict[str, Any] = {}
    for s in sampling.SAMPLER_SETTINGS:
        try:
            given[s.field] = s.check(doc[s.field])
        except (KeyError, errors.UsageError):
            continue  # not there, or not a value this client takes: the engine's default
    return SamplingParams(**given)


def _stats(usage: Mapping[str, Any], timings: Mapping[str, Any], ttft_ms: float) -> GenStats | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return GenStats(
        prompt_tokens=prompt,
        eval_prompt_tokens=int(timings.get("prompt_n", prompt - cached)),
        generated_tokens=int(usage.get("completion_tokens") or 0),
        ttft_ms=ttft_ms,
        prefill_tok_s=float(timings.get("prompt_per_second") or 0.0),
        decode_tok_s=float(timings.get("predicted_per_second") or 0.0),
        decode_wall_ms=float(timings.get("predicted_ms") or 0.0),
        llama_eval_ms=float(timings.get("llama_eval_ms") or 0.0),
        llama_sample_ms=float(timings.get("llama_sample_ms") or 0.0),
        reused_tokens=int(timings.get("reused_n") or 0),
        reused_from=str(timings.get("reused_from") or ""),
    )


def _same_model(asked: str, served_id: str, served_path: str) -> bool:
    """Whether a model argument names the served model: its id (with or without the quant),
    its catalog name or alias, or its file. The id is what the server was started with
    (`default`, or a reference without a quant, when it chose), so the file it loaded
    counts too: the hub repo of its Hugging Face cache folder, the quant in its name."""
    from qwenrun.hub import names

    text = asked.strip()
    if text.lower() == served_id.lower():
        return True
    if served_path and text.lower().endswith(".gguf"):
        return Path(text).name == Path(served_path).name
    base, _, quant = text.rpartition(":") if ":" in text else (text, "", "")
    served_base, _, served_quant = served_id.rpartition(":")
    if not served_base:
        served_base, served_quant = served_id, ""
    served_quant = served_quant or names.parse_quant(Path(served_path).name) or ""
    quant_ok = not quant or quant.lower() == served_quant.lower()
    if base.lower() == served_base.lower():
        return quant_ok
    try:
        from qwenrun.hub import refs

        ref = refs.parse_ref(base)
    except errors.QwenrunError:
        return False
    known = {ref.name.lower(), *(r.lower() for r in ref.repos)}
    served = {served_base.lower(), _cache_repo(served_path).lower()}
    return bool(known & served) and quant_ok


def _cache_repo(path: str) -> str:
    """The hub repo of a file in the Hugging Face cache (`models--owner--repo`), else ""."""
    for part in Path(path).parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/", 1)
    return ""
