"""Turn a Qwen model's streamed answer text into OpenAI tool calls, and OpenAI tool calls back
into what Qwen's chat templates render.

Contract: pure and incremental. `ToolCallParser(tools).feed(piece)` takes answer text as the
engine yields it and returns events: `Content` for plain text, and for each `<tool_call>` block
`CallStarted` (as soon as the function name is known), `CallArguments` (argument JSON text) and
`CallDone` (the whole `ToolCall`) once `</tool_call>` closes it; `finish()` ends the stream.
`parse_tool_calls(text)` is the one-shot form. The module imports only the standard library,
does no I/O and never raises on what the model wrote.

Qwen writes one of two formats inside `<tool_call>…</tool_call>`, told apart per block:

- JSON (Qwen3, Qwen3-2507, Qwen3-Next): `{"name": "f", "arguments": {"city": "Paris"}}`;
- XML (Qwen3.5/3.6, Qwen3-Coder): `<function=f>`, then `<parameter=city>\\nParis\\n</parameter>`
  per argument, then `</function>`. Values are raw text: exactly one newline is stripped from
  each end (the template adds them), then the value is typed by the tool's JSON schema when the
  request gave one (`convert_parameter_value`), else read as JSON if it looks like a JSON literal.

What it guarantees:

- A tag cut across pieces never leaks: only a possible start of `<tool_call>` is held back, and
  released as soon as it cannot be one. Events do not depend on how the text was cut (adjacent
  `Content` events may be split differently; their concatenation is the same).
- A block that is not a well-formed call (bad JSON, no name, `<function=` never closed, stray
  text between parameters, no `</tool_call>` by `finish()`) comes back as `Content`, verbatim,
  so the user sees what the model wrote. Its text is scanned again, so a good call after a
  broken one is still found. If `CallStarted` was already emitted for it, `CallAborted(index)`
  comes first; that index is never reused (a streaming client has already seen it). A server
  that must never show a call that fails can hold a call's events until its `CallDone`.
- Whitespace touching a parsed call (the template's `\\n\\n` before it, `\\n` between calls) is
  dropped; all other text is passed through unchanged.
- The concatenation of a call's `CallArguments` deltas is its `ToolCall.arguments_json`, a JSON
  object (emitted whole, just before `CallDone`: values can only be typed once complete).

What it does not do: split thinking from the answer (feed it the answer only; note that Qwen3.5
sometimes opens `<tool_call>` before `</think>`, which the caller must route here itself), check
calls against the tools (an unknown function name or a missing required argument is passed
on), or accept calls not wrapped in `<tool_call>` (Qwen3-Coder's bare `<function=…>`).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

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

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
FUNCTION_TAG = "<function="
FUNCTION_END = "</function>"
PARAMETER_TAG = "<parameter="
PARAMETER_END = "</parameter>"
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
    """A started call turned out malformed; its raw text follows as `Content`."""

    index: int


Event = Content | CallStarted | CallArguments | CallDone | CallAborted


def new_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class _Mode(Enum):
    TEXT = "text"  # plain answer text, looking for `<tool_call>`
    DETECT = "detect"  # just after `<tool_call>`: which format?
    JSON = "json"  # a JSON body, looking for `</tool_call>` outside its strings
    XML_NAME = "xml_name"  # after `<function=`, reading the name up to `>`
    XML_PARAMS = "xml_params"  # `<parameter=…>…</parameter>` pairs, then `</function>`
    XML_END = "xml_end"  # after `</function>`, expecting `</tool_call>`


@dataclass
class _OpenCall:
    index: int
    id: str
    name: str


# The head of a Qwen3 JSON call, `{"name": "…"`: the template writes the name first, so the
# name is usually known long before the (possibly long) arguments are.
_JSON_HEAD = re.compile(r'[ \t\r\n]*\{[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*"((?:[^"\\]|\\.)*)"')


class ToolCallParser:
    """An incremental parser of Qwen tool calls in answer text (see the module contract).

    `tools` is the request's OpenAI tool list; only the parameter schemas of XML-format calls
    are read from it. `id_factory` makes call ids (default `new_call_id`).
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        self._schemas = _parameter_schemas(tools)
        self._new_id = id_factory or new_call_id
        self._mode = _Mode.TEXT
        self._buf = ""  # TEXT: text not yet released (trailing whitespace, a partial tag)
        self._block = ""  # in a block: everything after its `<tool_call>`, kept for fallback
        self._pos = 0  # how far into `_block` the parse has got
        self._scan = 0  # XML: where to look for the current value's `</parameter>`
        self._in_string = False  # JSON: whether `_pos` is inside a JSON string
        self._escaped = False  # JSON: whether the previous character was a backslash in one
        self._held_ws = ""  # whitespace before `<tool_call>`: dropped, unless the block fails
        self._after_call = False  # whitespace right after a parsed call is dropped
        self._call: _OpenCall | None = None
        self._params: dict[str, Any] = {}
        self._next_index = 0
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise ValueError("feed() after finish()")
        if self._mode is _Mode.TEXT:
            self._buf += text
        else:
            # Appended through a local that holds the only reference, so CPython can grow the
            # string in place: `self._block += text` would copy a long block on every token.
            block, self._block = self._block, ""
            block += text
            self._block = block
        events: list[Event] = []
        self._run(events)
        return events

    def finish(self) -> list[Event]:
        """The stream ended: an open block is malformed; held-back text is released."""
        events: list[Event] = []
        if self._finished:
            return events
        self._finished = True
        self._run(events)
        # Each abandoned block gives back its text, which may open another block: go on until
        # only plain text is left (each round consumes one `<tool_call>`, so this ends).
        while self._mode is not _Mode.TEXT:
            self._abandon(events)
            self._run(events)
        rest, self._buf = self._buf, ""
        self._emit(events, rest)
        return events

    # ---- the loop: each step consumes what it can; False means it must wait for more text

    def _run(self, events: list[Event]) -> None:
        while self._step(events):
            pass

    def _step(self, events: list[Event]) -> bool:
        mode = self._mode
        if mode is _Mode.TEXT:
            return self._text(events)
        if mode is _Mode.DETECT:
            return self._detect(events)
        if mode is _Mode.JSON:
            return self._json(events)
        if mode is _Mode.XML_NAME:
            return self._xml_name(events)
        if mode is _Mode.XML_PARAMS:
            return self._xml_params(events)
        return self._xml_end(events)

    def _text(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(OPEN_TAG)
        if at < 0:
            # Hold back a possible start of the tag and, before it, trailing whitespace (it is
            # dropped if a call follows).
            keep = _partial_suffix(buf, OPEN_TAG)
            body = buf[: len(buf) - keep].rstrip(_WS)
            self._emit(events, body)
            self._buf = buf[len(body) :]
            return False
        head = buf[:at]
        body = head.rstrip(_WS)
        self._emit(events, body)
        self._held_ws = head[len(body) :]
        self._buf = ""
        self._mode = _Mode.DETECT
        self._block = buf[at + len(OPEN_TAG) :]
        self._pos = self._scan = 0
        self._in_string = self._escaped = False
        self._call = None
        self._params = {}
        return True

    def _detect(self, events: list[Event]) -> bool:
        block = self._block
        start = _skip_ws(block, 0)
        if block.startswith("{", start):
            self._mode = _Mode.JSON
            self._pos = start
            return True
        if block.startswith(FUNCTION_TAG, start):
            self._mode = _Mode.XML_NAME
            self._pos = start + len(FUNCTION_TAG)
            return True
        if _is_partial(block, start, FUNCTION_TAG):
            return False  # nothing yet, or a partial `<function=`
        self._abandon(events)  # `<tool_call>` in prose, or a format Qwen does not write
        return True

    def _json(self, events: list[Event]) -> bool:
        block = self._block
        if self._call is None:
            head = _JSON_HEAD.match(block)
            if head:
                name = _json_string(head.group(1))
                if name and name.strip():
                    self._start(events, name)
        # Scan for `</tool_call>` outside JSON strings, so that an argument holding that very
        # text (code about tool calls) does not end the block.
        i = self._pos
        n = len(block)
        while i < n:
            ch = block[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch == "<":
                if block.startswith(CLOSE_TAG, i):
                    self._json_close(events, block[:i], block[i + len(CLOSE_TAG) :])
                    return True
                if _is_partial(block, i, CLOSE_TAG):
                    break  # a partial `</tool_call>`: look again from here
            i += 1
        self._pos = i
        return False

    def _json_close(self, events: list[Event], body: str, rest: str) -> None:
        parsed = _parse_json_call(body)
        if parsed is None or (self._call is not None and self._call.name != parsed[0]):
            self._abandon(events)
            return
        self._complete(events, parsed[0], parsed[1], rest)

    def _xml_name(self, events: list[Event]) -> bool:
        name = self._tag_value(self._pos)
        if name is None:
            return False
        if not name[0]:
            self._abandon(events)
            return True
        self._start(events, name[0])
        self._pos = name[1]
        self._mode = _Mode.XML_PARAMS
        return True

    def _xml_params(self, events: list[Event]) -> bool:
        block = self._block
        i = _skip_ws(block, self._pos)
        if block.startswith(PARAMETER_TAG, i):
            key = self._tag_value(i + len(PARAMETER_TAG))
            if key is None:
                return False
            if not key[0]:
                self._abandon(events)
                return True
            # The value runs to the first `</parameter>`: it may hold anything else, including
            # `</function>` and `</tool_call>` (Qwen3-Coder writing code about tool calls).
            end = block.find(PARAMETER_END, max(key[1], self._scan))
            if end < 0:
                # Next time, look only where a new `</parameter>` could be: a long value
                # arriving token by token is then scanned once, not once per token.
                self._scan = max(key[1], len(block) - len(PARAMETER_END) + 1)
                return False
            assert self._call is not None
            properties = self._schemas.get(self._call.name, {})
            schema = properties.get(key[0])
            value = _strip_one_newline(block[key[1] : end])
            self._params[key[0]] = convert_parameter_value(
                value, schema if isinstance(schema, Mapping) else None
            )
            self._pos = end + len(PARAMETER_END)
            self._scan = 0
            return True
        if block.startswith(FUNCTION_END, i):
            self._pos = i + len(FUNCTION_END)
            self._mode = _Mode.XML_END
            return True
        if _is_partial(block, i, PARAMETER_TAG) or _is_partial(block, i, FUNCTION_END):
            return False
        self._abandon(events)
        return True

    def _xml_end(self, events: list[Event]) -> bool:
        block = self._block
        i = _skip_ws(block, self._pos)
        if block.startswith(CLOSE_TAG, i):
            assert self._call is not None
            arguments = json.dumps(self._params, ensure_ascii=False)
            self._complete(events, self._call.name, arguments, block[i + len(CLOSE_TAG) :])
            return True
        if _is_partial(block, i, CLOSE_TAG):
            return False
        # Anything else after `</function>` (a second `<function=` in the same block, text) is
        # not the format the templates teach.
        self._abandon(events)
        return True

    # ---- helpers

    def _tag_value(self, start: int) -> tuple[str, int] | None:
        """The `NAME` of `<function=NAME>` / `<parameter=NAME>` from `start`, and the position
        after its `>`; None while it is incomplete; ("", _) when it cannot be a name."""
        block = self._block
        gt = block.find(">", start)
        pending = block[start:gt] if gt >= 0 else block[start:]
        # A newline or `<` before the `>` means the tag was never closed: the model moved on.
        if "\n" in pending or "<" in pending:
            return "", start
        if gt < 0:
            return None
        return pending.strip(_WS), gt + 1

    def _start(self, events: list[Event], name: str) -> None:
        call = _OpenCall(self._next_index, self._new_id(), name)
        self._next_index += 1
        self._call = call
        events.append(CallStarted(call.index, call.id, call.name))

    def _complete(self, events: list[Event], name: str, arguments: str, rest: str) -> None:
        if self._call is None:
            self._start(events, name)
        assert self._call is not None
        call = ToolCall(self._call.id, name, arguments)
        events.append(CallArguments(self._call.index, arguments))
        events.append(CallDone(self._call.index, call))
        self._to_text(rest)
        self._held_ws = ""
        self._after_call = True

    def _abandon(self, events: list[Event]) -> None:
        """The block is not a call: give back its text, from `<tool_call>` on, as plain text."""
        if self._call is not None:
            events.append(CallAborted(self._call.index))
        held, self._held_ws = self._held_ws, ""
        self._emit(events, held + OPEN_TAG)
        # Scanned again as text: it may hold a good call (after a broken one left unclosed).
        self._to_text(self._block)

    def _to_text(self, text: str) -> None:
        self._mode = _Mode.TEXT
        self._buf = text
        self._block = ""
        self._pos = 0
        self._call = None
        self._params = {}

    def _emit(self, events: list[Event], text: str) -> None:
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
        if text:
            events.append(Content(text))


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    id_factory: Callable[[], str] | None = None,
) -> tuple[str, list[ToolCall]]:
    """The whole-text form: (content, calls) of a finished answer."""
    parser = ToolCallParser(tools, id_factory=id_factory)
    events = parser.feed(text) + parser.finish()
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
            value = _loads(arguments)
        except (ValueError, RecursionError):
            raise ValueError(f"tool_calls[{i}].function.arguments is not valid JSON") from None
        if isinstance(value, dict):
            return value
    raise ValueError(f"tool_calls[{i}].function.arguments is not a JSON object")


# ---- XML parameter values


_TYPE_ALIASES = {
    "int": "integer",
    "float": "number",
    "double": "number",
    "bool": "boolean",
    "str": "string",
    "text": "string",
    "dict": "object",
    "list": "array",
}
# Tried in this order when a schema allows several types, the most specific first: a value
# that reads as one of them is taken as it, else it stays the string the model wrote.
_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array")
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FAIL = object()


def convert_parameter_value(value: str, schema: Mapping[str, Any] | None) -> Any:
    """An XML parameter's raw text (its one template newline on each end already removed) as
    the JSON value the tool expects.

    With a schema type: string → the text itself; integer/number → a number; boolean →
    true/false (case-insensitive: Qwen3.5's template writes Python's `True`); null → from
    `null`/`None`; object/array → the parsed JSON. Text that does not read as the type stays a
    string, so the tool sees what the model wrote rather than a guess. Without a usable schema,
    text that is a JSON number, true/false/null, object or array is parsed; the rest is a string.
    """
    types = _schema_types(schema) if schema is not None else set()
    if not types:
        return _guess(value)
    if types == {"string"}:
        return value
    text = value.strip(_WS)
    for kind in _TYPE_ORDER:
        if kind in types:
            converted = _as_type(text, kind)
            if converted is not _FAIL:
                return converted
    return value


def _schema_types(schema: Mapping[str, Any], depth: int = 0) -> set[str]:
    kind = schema.get("type")
    names: list[Any] = []
    if isinstance(kind, str):
        names = [kind]
    elif isinstance(kind, list):
        names = kind
    types = {_TYPE_ALIASES.get(n.lower(), n.lower()) for n in names if isinstance(n, str)}
    if types or depth > 4:
        return types
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for option in options:
                if isinstance(option, Mapping):
                    types |= _schema_types(option, depth + 1)
    enum = schema.get("enum")
    if not types and isinstance(enum, list):
        types = {_json_type(v) for v in enum}
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _as_type(text: str, kind: str) -> Any:
    lowered = text.lower()
    if kind == "null":
        return None if lowered in ("null", "none") else _FAIL
    if kind == "boolean":
        return lowered == "true" if lowered in ("true", "false") else _FAIL
    if kind in ("integer", "number"):
        try:
            if _INTEGER.fullmatch(text):
                return int(text)
            if _NUMBER.fullmatch(text):
                number = float(text)
                if not math.isfinite(number):
                    return _FAIL
                # An integer written as `3.0` is still an integer.
                if kind == "integer":
                    return int(number) if number.is_integer() else _FAIL
                return number
        except ValueError:  # an integer too long for int() (Python's digit limit)
            return _FAIL
        return _FAIL
    if kind in ("object", "array"):
        try:
            parsed = _loads(text)
        except (ValueError, RecursionError):
            return _FAIL
        wanted = dict if kind == "object" else list
        return parsed if isinstance(parsed, wanted) else _FAIL
    return _FAIL


def _guess(value: str) -> Any:
    text = value.strip(_WS)
    looks_json = (
        text[:1] in ("{", "[")
        or text in ("true", "false", "null")
        or _JSON_NUMBER.fullmatch(text) is not None
    )
    if looks_json:
        try:
            return _loads(text)
        except (ValueError, RecursionError):
            pass
    return value


# ---- small pieces


def _parameter_schemas(
    tools: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Mapping[str, Any]]:
    """Function name → its parameters' `properties`, from OpenAI tools (or bare functions)."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            continue
        name = function.get("name")
        parameters = function.get("parameters")
        if isinstance(name, str) and isinstance(parameters, Mapping):
            properties = parameters.get("properties")
            if isinstance(properties, Mapping):
                schemas[name] = properties
    return schemas


def _parse_json_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a JSON-format call body, or None if it is not one."""
    try:
        value = _loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    arguments = value.get("arguments")
    if arguments is None:
        arguments = {}  # a function without parameters
    elif isinstance(arguments, str):
        # Arguments encoded twice, as OpenAI's wire format has them: accept the object inside.
        try:
            arguments = _loads(arguments) if arguments.strip(_WS) else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, which `json.dumps` would write back as invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _json_string(inner: str) -> str | None:
    try:
        value = json.loads('"' + inner + '"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _strip_one_newline(value: str) -> str:
    # The template writes `>\n` + value + `\n</`: exactly those two newlines are markup (as in
    # vLLM's qwen3coder parser); any others belong to the value.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _is_partial(text: str, i: int, tag: str) -> bool:
    """Whether `text[i:]` is a proper start of `tag` (the empty string included)."""
    return len(text) - i < len(tag) and tag.startswith(text[i:])


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
