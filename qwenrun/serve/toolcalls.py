"""Turn a Qwen model's streamed answer text into OpenAI tool calls, and OpenAI tool calls back
into what Qwen's chat templates render.

Contract: pure and incremental. `ToolCallParser(tools).feed(piece)` takes answer text as the
engine yields it and returns events: `Content` for plain text; for each call `CallStarted`
(id and name), `CallArguments` (pieces of the argument JSON, as they are written) and
`CallDone` (the whole `ToolCall`) once the call is known to be whole; `CallAborted` for a
started call the text ended inside of. `finish(model_ended=…)` ends the stream.
`parse_tool_calls(text)` is the one-shot form. The module and its two helpers
(`toolcalls_xml`: the XML form; `toolcalls_values`: names, schemas, typed values) import only
the standard library, do no I/O and never raise on what the model wrote. Each piece of text is
looked at a bounded number of times, so time is linear in the answer's length (measured by
benchmarks/toolcall_parse.py).

The forms Qwen writes (told apart per call):

- JSON (Qwen3, Qwen3-2507, Qwen3-Next): `<tool_call>{"name": "f", "arguments": {…}}</tool_call>`
  (`"parameters"` is read as `"arguments"`; arguments given as a JSON string are decoded);
- XML (Qwen3.5/3.6, Qwen3-Coder): `<tool_call><function=f><parameter=k>\\nv\\n</parameter>
  </function></tool_call>`, read by `toolcalls_xml` (where values end, how they are typed);
- XML without `<tool_call>` (Qwen3-Coder, about one tool turn in five by Ollama's count):
  `<function=NAME>…</function>` is a call when NAME is one of the request's tools (never
  without tools); an orphan `</tool_call>` right after it is swallowed;
- several `<function=…>` blocks inside one `<tool_call>`: one call each.

What it guarantees:

- A call is only a call when its function name is one of the request's tools (without tools:
  any name-like name; never template syntax such as `{{ tc.name }}`) and, for JSON, its body is
  a JSON object with a string name and object arguments. Anything else is `Content`, verbatim.
- `CallDone` comes once the model has moved past the call: `</tool_call>`, a next call, or
  other text after `</function>`. When the stream ends inside a call, `finish(model_ended=True)`
  (the model's end-of-generation, or a client's stop string, ended the text) still completes a
  call that is whole: XML with its `</function>` (or at least one parameter closed, nothing but
  whitespace after it), JSON whose body parses. Without `model_ended` (cut by max_tokens, or
  cancelled) an open call is never completed: its text comes back as `Content`.
- XML calls are announced (`CallStarted`) once their structure is confirmed (the first
  `<parameter=` or `</function>` after a valid name) and their arguments stream: string
  parameters as written, other parameters whole when they end. The concatenation of a call's
  `CallArguments` is its `ToolCall.arguments_json`, which is valid JSON only with the last
  piece, sent just before `CallDone`: a client that joins the pieces can never run a call that
  was cut. JSON calls are announced, with their arguments whole, when they end.
- `CallAborted(index)` follows a started call that the text ended inside of before it was
  whole; its raw text then follows as `Content`. An index is never reused (a streaming client
  has seen it). (Once started, an XML call cannot otherwise fail: a value runs until one of
  the closing rules holds, so no stray text can come between parameters.)
- Tags cut across pieces never leak; events do not depend on how the text was cut (adjacent
  `Content`, and one call's adjacent `CallArguments`, may be split differently).
- Whitespace touching a call is dropped; where text resumes after a call and there was text
  before it, one space separates them ("it. It is sunny", not "it.It is sunny"). All other
  text is passed through unchanged.
- A block that fails is given back as text and scanning goes on after the point where it
  failed: after `<tool_call>` for a bad name or form, at the stray text for a broken XML body,
  after `</tool_call>` for a JSON body that does not parse (whose last inner `<tool_call>` is
  tried once, so a good call written after a broken opening is still found). What is left open
  at `finish()` is text as a whole: text inside a cut call (a `write_file` of code about tool
  calls) is never read again as calls.

Where the peers (vLLM's qwen3coder/qwen3xml/hermes parsers, SGLang's Qwen detectors,
llama.cpp's chat parsers) disagree, the reading taken here, and why:

- Text after a call is kept as content (vLLM and SGLang drop it, llama.cpp's grammar forbids
  it): it is what the model said.
- A call cut by max_tokens is not a call (vLLM's non-streaming path and SGLang emit it with the
  arguments written so far): a tool must not run with half its arguments. The same holds for a
  value still open when the model stops (vLLM takes it as ended).
- Arguments that are not a JSON object (`"arguments": [1]`) stay content (vLLM wraps or
  passes them): OpenAI's `function.arguments` is an object.
- A name not among the request's tools stays content (vLLM emits it and logs a warning;
  llama.cpp's grammar cannot write it): an agent would fail on an unknown tool anyway, and text
  is what the model wrote.
- A `<function=` block with stray text before its first parameter, or a name tag never closed,
  is not a call (vLLM's regexes skip the stray text): the format was not followed. Stray text
  after a `</parameter>` belongs to that value (rule 1 of `toolcalls_xml`; vLLM reads it so).
- JSON-form arguments are sent whole when the call ends (vLLM's hermes parser streams the
  partial JSON text): only a parsed body tells an object from an array, `"arguments"` from
  `"parameters"`, or arguments encoded twice, and re-encoding it is what makes them valid JSON.
- A repeated parameter: each value is streamed as written, so the arguments text holds the key
  twice and JSON readers keep the last (vLLM's non-streaming path keeps the last, its streaming
  path sends both, as here).

Thinking is not split here (feed the answer only); `serve.answer_router.AnswerRouter` decides
whether a `<tool_call>` written inside thinking belongs to the answer.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from qwenrun.serve.toolcalls_values import (
    MAX_NAME,
    ToolTable,
    convert_parameter_value,
    loads_strict,
)
from qwenrun.serve.toolcalls_xml import (
    CLOSE_TAG,
    FUNCTION_TAG,
    OPEN_TAG,
    Outcome,
    XmlFunction,
    is_partial,
    read_tag_name,
    skip_ws,
)

__all__ = [
    "CallAborted",
    "CallArguments",
    "CallDone",
    "CallStarted",
    "Content",
    "Event",
    "ToolCall",
    "ToolCallParser",
    "convert_parameter_value",
    "history_tool_calls",
    "new_call_id",
    "parse_tool_calls",
    "tool_call_to_openai",
]

_WS = " \t\r\n"
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str  # a JSON object, as OpenAI's `function.arguments`

    @property
    def arguments(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.arguments_json)
        return value


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    delta: str


@dataclass(frozen=True)
class CallDone:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class CallAborted:
    """The text ended inside a started call before it was whole (cut by max_tokens, or the
    model stopped mid-value); its raw text follows as `Content`."""

    index: int


Event = Content | CallStarted | CallArguments | CallDone | CallAborted


def new_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class _Mode(Enum):
    TEXT = "text"  # plain answer text, looking for `<tool_call>` (and bare `<function=`)
    OPENED = "opened"  # just after `<tool_call>`: which form?
    JSON = "json"  # a JSON body, looking for `</tool_call>` outside its strings
    XML_NAME = "xml_name"  # after `<function=`, reading the name up to `>`
    XML_BODY = "xml_body"  # parameters, read by toolcalls_xml.XmlFunction
    AFTER = "after"  # after `</function>`: `</tool_call>`, another function, or text


# Where the JSON scan stops: outside strings a quote or a possible `</tool_call>`; inside, a
# quote or a backslash. Everything between is skipped at C speed.
_JSON_OUTSIDE = re.compile(r'["<]')
_JSON_INSIDE = re.compile(r'["\\]')


class ToolCallParser:
    """An incremental parser of Qwen tool calls in answer text (see the module contract).

    `tools` is the request's OpenAI tool list: the function names calls may use and the
    parameter schemas that type XML values. `id_factory` makes call ids (default
    `new_call_id`).
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        self._tools = ToolTable(tools)
        # Bare `<function=NAME>` needs the request's names; the longest bounds the hold-back.
        self._bare = bool(self._tools.names)
        self._bare_limit = min(MAX_NAME, self._tools.longest_name() + 8)
        self._new_id = id_factory or new_call_id
        self._mode = _Mode.TEXT
        # TEXT: text not yet decided; in a call: everything from its first tag on (given back
        # verbatim if it is not a call after all).
        self._buf = ""
        self._pos = 0  # how far into `_buf` the parse has got
        self._ws: list[str] = []  # whitespace after the last text given out: held
        self._block_ws: list[str] = []  # the held whitespace before the current call
        self._after_call = False  # whitespace right after a call is dropped
        self._said = False  # whether any text has been given out
        self._wrapped = False  # the current call sits inside `<tool_call>`
        self._in_string = False  # JSON: inside a string
        self._xml: XmlFunction | None = None
        self._started: tuple[int, str] | None = None  # (index, id) of an announced call
        self._arguments: list[str] = []  # the current call's argument pieces
        self._next_index = 0
        self._finished = False
        self._model_ended = False

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise ValueError("feed() after finish()")
        # Grown through a local that holds the only reference, so CPython can extend the
        # string in place: `self._buf += text` would copy a long call on every token.
        buf, self._buf = self._buf, ""
        buf += text
        self._buf = buf
        events: list[Event] = []
        self._run(events)
        return events

    def finish(self, *, model_ended: bool = False) -> list[Event]:
        """The stream ended. `model_ended`: the model ended it (end-of-generation, or a client's
        stop string cut it), so an open call that is whole is still a call; otherwise (max_tokens,
        cancel) an open call is text. Held-back text is released."""
        events: list[Event] = []
        if self._finished:
            return events
        self._finished, self._model_ended = True, model_ended
        self._run(events)
        # Each round ends the open call (whole, or given back as text) and reads what is left.
        while self._mode is not _Mode.TEXT:
            if not (model_ended and self._whole_at_end(events)):
                self._abandon(events, len(self._buf))
            self._run(events)
        self._emit(events, "".join(self._ws))
        self._ws = []
        return events

    # ---- the loop: each step consumes what it can; False means it must wait for more text

    def _run(self, events: list[Event]) -> None:
        while self._step(events):
            pass

    def _step(self, events: list[Event]) -> bool:
        mode = self._mode
        if mode is _Mode.TEXT:
            return self._text(events)
        if mode is _Mode.XML_BODY:
            return self._xml_body(events)
        if mode is _Mode.OPENED:
            return self._opened(events)
        if mode is _Mode.JSON:
            return self._json(events)
        if mode is _Mode.XML_NAME:
            return self._xml_name(events)
        return self._after(events)

    def _text(self, events: list[Event]) -> bool:
        buf, final = self._buf, self._finished
        i = self._pos
        while True:
            lt = buf.find("<", i)
            if lt < 0:
                self._out(events, buf)
                self._buf, self._pos = "", 0
                return False
            if buf.startswith(OPEN_TAG, lt):
                self._out(events, buf[:lt])
                self._open(buf[lt:], len(OPEN_TAG), wrapped=True)
                self._mode = _Mode.OPENED
                return True
            if self._bare and buf.startswith(FUNCTION_TAG, lt):
                tag = read_tag_name(buf, lt + len(FUNCTION_TAG), self._bare_limit, final)
                if tag is None:
                    return self._hold(events, lt)
                name, after = tag
                if name and self._tools.is_function(name):
                    self._out(events, buf[:lt])
                    self._open(buf[lt:], after - lt, wrapped=False)
                    self._xml = XmlFunction(name, self._tools.properties(name), self._pos)
                    self._mode = _Mode.XML_BODY
                    return True
            elif not final and (
                is_partial(buf, lt, OPEN_TAG) or (self._bare and is_partial(buf, lt, FUNCTION_TAG))
            ):
                return self._hold(events, lt)
            i = lt + 1

    def _hold(self, events: list[Event], at: int) -> bool:
        """Give out the text before `at`; keep the rest (a tag that may be one) for later."""
        self._out(events, self._buf[:at])
        self._buf, self._pos = self._buf[at:], 0
        return False

    def _opened(self, events: list[Event]) -> bool:
        buf = self._buf
        i = self._pos = skip_ws(buf, self._pos)
        if buf.startswith("{", i):
            self._mode = _Mode.JSON
            self._in_string = False
            return True
        if buf.startswith(FUNCTION_TAG, i):
            self._pos = i + len(FUNCTION_TAG)
            self._mode = _Mode.XML_NAME
            return True
        if i == len(buf) or (not self._finished and is_partial(buf, i, FUNCTION_TAG)):
            return False
        self._abandon(events, len(OPEN_TAG))  # `<tool_call>` in prose, or no form Qwen writes
        return True

    def _json(self, events: list[Event]) -> bool:
        buf = self._buf
        n = len(buf)
        i, in_string = self._pos, self._in_string
        # Scan for `</tool_call>` outside JSON strings, so that an argument holding that very
        # text (code about tool calls) does not end the block.
        while True:
            if in_string:
                m = _JSON_INSIDE.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                if buf[j] == "\\":
                    if j + 1 >= n:
                        i = j  # the escaped character is still to come
                        break
                    i = j + 2
                    continue
                in_string, i = False, j + 1
                continue
            m = _JSON_OUTSIDE.search(buf, i)
            if m is None:
                i = n
                break
            j = m.start()
            if buf[j] == '"':
                in_string, i = True, j + 1
                continue
            if buf.startswith(CLOSE_TAG, j):
                self._json_close(events, j)
                return True
            if not self._finished and is_partial(buf, j, CLOSE_TAG):
                i = j
                break
            i = j + 1
        self._pos, self._in_string = i, in_string
        return False

    def _json_close(self, events: list[Event], close: int) -> None:
        buf = self._buf
        body = buf[len(OPEN_TAG) : close]
        rest = buf[close + len(CLOSE_TAG) :]
        parsed = self._json_call(body)
        if parsed is not None:
            self._complete(events, parsed[0], parsed[1], rest)
            return
        # A broken opening followed by a good call (both closed by this `</tool_call>`): try
        # the last opening once, so the good call is not lost and no text is read twice.
        inner = body.rfind(OPEN_TAG)
        parsed = self._json_call(body[inner + len(OPEN_TAG) :]) if inner >= 0 else None
        if parsed is not None:
            head = "".join(self._block_ws) + buf[: len(OPEN_TAG) + inner]
            self._block_ws = []
            self._out(events, head)
            self._ws = []  # the whitespace before the good call is the call's
            self._complete(events, parsed[0], parsed[1], rest)
            return
        self._abandon(events, close + len(CLOSE_TAG))

    def _json_call(self, body: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a JSON-form call body, or None if it is not one."""
        try:
            value = loads_strict(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        name = value.get("name")
        if not isinstance(name, str) or not self._tools.is_function(name.strip()):
            return None
        arguments = value.get("arguments", value.get("parameters"))
        if arguments is None:
            arguments = {}  # a function without parameters
        elif isinstance(arguments, str):
            # Arguments encoded twice, as OpenAI's wire format has them: take the object inside.
            try:
                arguments = loads_strict(arguments) if arguments.strip(_WS) else {}
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        return name.strip(), json.dumps(arguments, ensure_ascii=False)

    def _xml_name(self, events: list[Event]) -> bool:
        tag = read_tag_name(self._buf, self._pos, MAX_NAME, self._finished)
        if tag is None:
            return False
        name, after = tag
        if not name or not self._tools.is_function(name):
            # Not a call: give back what came before the name as text (after `<tool_call>`, or
            # from this `<function=` when it follows a call in the same block).
            self._abandon(events, len(OPEN_TAG) if self._buf.startswith(OPEN_TAG) else 1)
            return True
        self._xml = XmlFunction(name, self._tools.properties(name), after)
        self._mode = _Mode.XML_BODY
        return True

    def _xml_body(self, events: list[Event]) -> bool:
        xml = self._xml
        assert xml is not None
        outcome = xml.read(self._buf, self._finished, self._model_ended)
        self._send_arguments(events, xml)
        if outcome is Outcome.WAIT:
            return False
        if outcome is Outcome.BROKEN:
            self._abandon(events, xml.pos)
            return True
        if outcome is Outcome.BLOCK_END:
            self._finish_xml(events, self._buf[xml.pos :])
            return True
        self._pos = xml.pos
        self._mode = _Mode.AFTER
        return True

    def _after(self, events: list[Event]) -> bool:
        """After `</function>`: the block's close, another function in the same block, or the
        model moving on; any of them makes the call whole."""
        buf = self._buf
        i = self._pos = skip_ws(buf, self._pos)
        if buf.startswith(CLOSE_TAG, i):
            # (For a bare call this is the orphan closer Qwen3-Coder writes: swallowed.)
            self._finish_xml(events, buf[i + len(CLOSE_TAG) :])
            return True
        if self._wrapped and buf.startswith(FUNCTION_TAG, i):
            self._finish_xml(events, "")
            # The next function belongs to the same block: its text is what is given back if
            # it fails.
            self._open(buf[i:], len(FUNCTION_TAG), wrapped=True)
            self._mode = _Mode.XML_NAME
            return True
        # Nothing yet, or the start of a closer: wait (at the end, `finish` decides: the text
        # stopped before the model moved on).
        if is_partial(buf, i, CLOSE_TAG) or (self._wrapped and is_partial(buf, i, FUNCTION_TAG)):
            return False
        self._finish_xml(events, buf[i:])  # text after the call (or another `<tool_call>`)
        return True

    def _whole_at_end(self, events: list[Event]) -> bool:
        """At the end of a text the model ended: complete the open call if it is whole."""
        if self._mode is _Mode.AFTER:
            self._finish_xml(events, self._buf[self._pos :])  # (a closer's start, as text)
            return True
        if self._mode is _Mode.XML_BODY and self._xml is not None and self._xml.complete_at_end():
            self._finish_xml(events, "")
            return True
        if self._mode is _Mode.JSON:
            parsed = self._json_call(self._buf[len(OPEN_TAG) :])
            if parsed is not None:
                self._complete(events, parsed[0], parsed[1], "")
                return True
        return False

    # ---- calls

    def _open(self, block: str, pos: int, *, wrapped: bool) -> None:
        """A possible call begins: `block` is its text from the first tag on."""
        self._buf, self._pos = block, pos
        self._block_ws, self._ws = self._ws, []
        self._wrapped = wrapped
        self._started = None
        self._arguments = []

    def _announce(self, events: list[Event], name: str) -> tuple[int, str]:
        if self._started is None:
            self._started = (self._next_index, self._new_id())
            self._next_index += 1
            events.append(CallStarted(self._started[0], self._started[1], name))
        return self._started

    def _send_arguments(self, events: list[Event], xml: XmlFunction) -> None:
        if not xml.started:
            return
        index, _ = self._announce(events, xml.name)
        for delta in xml.take_deltas():
            self._arguments.append(delta)
            events.append(CallArguments(index, delta))

    def _finish_xml(self, events: list[Event], rest: str) -> None:
        xml = self._xml
        assert xml is not None
        self._send_arguments(events, xml)
        self._arguments.append(xml.close_arguments())
        self._complete(events, xml.name, "".join(self._arguments), rest, last=self._arguments[-1])

    def _complete(
        self, events: list[Event], name: str, arguments: str, rest: str, last: str | None = None
    ) -> None:
        """The call is whole: its last argument piece and `CallDone`; `rest` is read on."""
        index, call_id = self._announce(events, name)
        events.append(CallArguments(index, arguments if last is None else last))
        events.append(CallDone(index, ToolCall(call_id, name, arguments)))
        self._to_text(rest)
        self._block_ws = []
        self._after_call = True

    def _abandon(self, events: list[Event], upto: int) -> None:
        """Not a call: its text up to `upto` is given back as text, and scanning goes on from
        there (at the end, `upto` is the whole text)."""
        if self._started is not None:
            events.append(CallAborted(self._started[0]))
        buf = self._buf
        held = "".join(self._block_ws)
        self._block_ws = []
        self._to_text(buf[upto:])
        self._out(events, held + buf[:upto])

    def _to_text(self, text: str) -> None:
        self._mode = _Mode.TEXT
        self._buf, self._pos = text, 0
        self._xml = None
        self._started = None
        self._arguments = []

    # ---- text out

    def _out(self, events: list[Event], text: str) -> None:
        """Give out text, holding back its trailing whitespace (dropped if a call follows)."""
        if not text:
            return
        body = text.rstrip(_WS)
        if not body:
            self._ws.append(text)
            return
        held = "".join(self._ws)
        self._ws = [text[len(body) :]] if len(body) < len(text) else []
        self._emit(events, held + body)

    def _emit(self, events: list[Event], text: str) -> None:
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
            if self._said:
                text = " " + text  # text on both sides of a call: keep them apart
        if text:
            self._said = True
            events.append(Content(text))


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    id_factory: Callable[[], str] | None = None,
    model_ended: bool = False,
) -> tuple[str, list[ToolCall]]:
    """The whole-text form: (content, calls) of a finished answer."""
    parser = ToolCallParser(tools, id_factory=id_factory)
    events = parser.feed(text) + parser.finish(model_ended=model_ended)
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, [e.call for e in events if isinstance(e, CallDone)]


def tool_call_to_openai(call: ToolCall) -> dict[str, Any]:
    """A call as an OpenAI response's `message.tool_calls[i]`."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


def history_tool_calls(tool_calls: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """An OpenAI request's assistant `tool_calls` in the form Qwen's templates render.

    OpenAI sends `function.arguments` as a JSON string; the Qwen3.5/3.6 and Qwen3-Coder
    templates iterate it with `|items`, which fails on a string, and Qwen3 `tojson`s a mapping
    (a string it pastes as is). So arguments become a dict for all of them. Raises ValueError
    for a call without a name or with arguments that are not a JSON object: that is the
    client's error (a 400), not the model's.
    """
    out: list[dict[str, Any]] = []
    for i, item in enumerate(tool_calls):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool_calls[{i}] has no function name")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {
                "name": function["name"],
                "arguments": _arguments_mapping(function.get("arguments"), i),
            },
        }
        if isinstance(item.get("id"), str):
            entry["id"] = item["id"]
        out.append(entry)
    return out


def _arguments_mapping(arguments: Any, i: int) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if isinstance(arguments, str):
        if not arguments.strip(_WS):
            return {}  # some clients send "" for a call without arguments
        try:
            value = loads_strict(arguments)
        except (ValueError, RecursionError):
            raise ValueError(f"tool_calls[{i}].function.arguments is not valid JSON") from None
        if isinstance(value, dict):
            return value
    raise ValueError(f"tool_calls[{i}].function.arguments is not a JSON object")


# ---- small pieces
