"""Read the body of one XML-form Qwen tool call, `<function=NAME>` … `</function>`,
incrementally, into OpenAI argument JSON that is sent as it is written.

Contract: pure, standard library only, never raises on what the model wrote. The caller
(`toolcalls.ToolCallParser`) owns the text: it reads `<function=NAME>` with `read_tag_name`,
makes an `XmlFunction` at the position after it, and calls `read(buf, final, ended)` with the
whole text so far (the same string, grown) until it reports where the function ended or that
the body is not the format (`final`: no more text will come; `ended`: the model ended it, so
the end of the text is itself a follower that closes a value). `take_deltas()` gives the
argument JSON written since the last call; their concatenation, ended by `close_arguments()`,
is the call's arguments: a JSON object, which is valid JSON only with that last piece. Each
`read` looks only at text it has not decided yet, so a body fed in pieces is read in time
linear in its length.

The format, as Qwen3.5/3.6 and Qwen3-Coder templates write it: `<parameter=KEY>\\nVALUE\\n
</parameter>` per argument, whitespace between them, then `</function>`. A value is raw text
with exactly one newline stripped from each end (the template's); string parameters are sent
character by character as JSON string text (all but a held-back final newline and any text that
may still turn out to be markup); other values are typed by the schema
(`toolcalls_values.convert_parameter_value`) and sent whole when they end.

Where a value ends (the rules, decided with bounded lookahead so that they can stream):

1. `</parameter>`, or a drifted close (`</parameter1>`, `</parameters>`, a bare `</parameter`),
   ends the value only when what follows it, after whitespace, is `<parameter=K>` with K one of
   the function's parameters (any name-like K when the request gave no schema for it),
   `</function>`, `</tool_call>`, or the end of the text the model ended (not of a text cut by
   max_tokens: the value may have gone on). Anywhere else it is part of
   the value: code that writes such tags keeps them (vLLM's lookahead rule).
2. A missing close: a line that starts `<parameter=K>`, K a parameter of the function not given
   yet in this call, ends the value there (vLLM and SGLang close at the next `<parameter=`;
   the "not given yet" and schema conditions keep a literal `<parameter=other>` line inside
   code from cutting it).
3. A missing close before the end of the call: `</function>` followed by `</tool_call>`, a new
   `<tool_call>` or `<function=`, or the end; `</tool_call>` followed by a new `<tool_call>` or
   the end (then `</function>` is missing too).
4. A whole call written inside a value (code about tool calls): a `<function=NAME>` at the end of
   a line opens a literal level, its `</function>` closes it; inside it no tag ends the value.

What it cannot tell apart: a value whose text holds exactly a closing sequence
(`</parameter>` then `</function>`) with no `<function=NAME>` line before it is taken to end
there, and an unbalanced `<function=NAME>` line inside a value keeps the next close literal.
vLLM resolves both with the whole text in hand (non-streaming); this reader streams.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from qwenrun.serve.toolcalls_values import (
    MAX_NAME,
    convert_parameter_value,
    is_name_like,
    is_string_only,
)

__all__ = [
    "CLOSE_TAG",
    "FUNCTION_END",
    "FUNCTION_TAG",
    "OPEN_TAG",
    "Outcome",
    "XmlFunction",
    "is_partial",
    "read_tag_name",
    "skip_ws",
]

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
FUNCTION_TAG = "<function="
FUNCTION_END = "</function>"
PARAMETER_TAG = "<parameter="
PARAMETER_END = "</parameter>"
_PARAMETER_STEM = "</parameter"
_WS = " \t\r\n"
# How many characters after `</parameter` a drifted close may have (`1>`, `s>`).
_DRIFT = 16


class Outcome(Enum):
    WAIT = "wait"  # more text is needed
    FUNCTION_END = "function_end"  # `</function>` read; `pos` is after it
    BLOCK_END = "block_end"  # `</tool_call>` read where `</function>` was due; `pos` after it
    BROKEN = "broken"  # text that is not the format at `pos` (between parameters)


def read_tag_name(buf: str, start: int, limit: int, final: bool) -> tuple[str, int] | None:
    """The NAME of `<function=NAME>` / `<parameter=NAME>` whose text starts at `start`, and the
    position after its `>`; None while it may still come; ("", start) when it cannot be a name
    (a newline or `<` before the `>`, more than `limit` characters, or the text ended)."""
    end = min(len(buf), start + limit + 1)
    gt = buf.find(">", start, end)
    if gt < 0:
        seg = buf[start:end]
        if final or "\n" in seg or "<" in seg or end - start > limit:
            return "", start
        return None
    name = buf[start:gt]
    if "\n" in name or "<" in name:
        return "", start
    return name.strip(" \t"), gt + 1


def is_partial(buf: str, i: int, tag: str) -> bool:
    """Whether `buf[i:]` is a proper start of `tag` (the text ends inside it)."""
    return len(buf) - i < len(tag) and tag.startswith(buf[i:])


def skip_ws(buf: str, i: int) -> int:
    """The first position from `i` on that is not whitespace (or the end)."""
    n = len(buf)
    while i < n and buf[i] in _WS:
        i += 1
    return i


def _escape(text: str) -> str:
    """`text` as the inside of a JSON string (escaping is per character, so pieces concatenate
    to the escaping of the whole)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class _State(Enum):
    PARAMS = "params"  # between parameters: `<parameter=`, `</function>` or whitespace
    VALUE = "value"  # inside a value, looking for where it ends
    ENDED = "ended"


class XmlFunction:
    """One function body being read (see the module contract). `properties` are the
    function's parameter schemas by name (empty: none known)."""

    def __init__(self, name: str, properties: Mapping[str, Any], pos: int) -> None:
        self.name = name
        self.pos = pos
        self.started = False  # a parameter or `</function>` has confirmed the format
        self._properties = properties
        self._known = frozenset(k for k in properties if isinstance(k, str))
        self._state = _State.PARAMS
        self._deltas: list[str] = []
        self._count = 0  # parameters read (also: whether `{` was sent)
        self._given: set[str] = set()
        # The value being read.
        self._key = ""
        self._start = -1  # where its text starts (after the template's newline); -1: undecided
        self._scan = 0  # where to look for the next `<`
        self._literal = 0  # depth of `<function=…>` … `</function>` written inside it
        self._stream = False  # a string parameter, sent as it is written
        self._sent = 0  # streamed up to here
        # A lookahead in progress: (position of the tag, where its whitespace skip got to).
        self._look = (-1, 0)
        self._ended = False  # (for this read) the text ended where the model ended it

    # ---- the caller's side

    def read(self, buf: str, final: bool, ended: bool = False) -> Outcome:
        self._ended = final and ended
        while True:
            if self._state is _State.VALUE:
                if not self._value(buf, final):
                    return Outcome.WAIT
                continue
            if self._state is _State.ENDED:
                return Outcome.FUNCTION_END
            outcome = self._params(buf, final)
            if outcome is not None:
                return outcome

    def take_deltas(self) -> list[str]:
        deltas, self._deltas = self._deltas, []
        return deltas

    def close_arguments(self) -> str:
        """The last piece of the arguments: `}` (or `{}` for a call without any)."""
        return "}" if self._count else "{}"

    def complete_at_end(self) -> bool:
        """Whether, the model having stopped here, the call is whole: `</function>` came, or
        at least one parameter was read and nothing but whitespace followed it."""
        return self._state is _State.ENDED or (self._state is _State.PARAMS and self._count > 0)

    # ---- between parameters

    def _params(self, buf: str, final: bool) -> Outcome | None:
        i = self.pos = skip_ws(buf, self.pos)
        if buf.startswith(PARAMETER_TAG, i):
            tag = read_tag_name(buf, i + len(PARAMETER_TAG), MAX_NAME, final)
            if tag is None:
                return Outcome.WAIT
            key, after = tag
            if not key:
                return Outcome.BROKEN
            self._open_value(key, after)
            return None
        if buf.startswith(FUNCTION_END, i):
            self.started = True
            self.pos = i + len(FUNCTION_END)
            self._state = _State.ENDED
            return Outcome.FUNCTION_END
        if buf.startswith(CLOSE_TAG, i):
            self.started = True
            self.pos = i + len(CLOSE_TAG)
            self._state = _State.ENDED
            return Outcome.BLOCK_END
        if i == len(buf) or (
            not final
            and any(is_partial(buf, i, t) for t in (PARAMETER_TAG, FUNCTION_END, CLOSE_TAG))
        ):
            return Outcome.WAIT
        return Outcome.BROKEN

    def _open_value(self, key: str, after: int) -> None:
        self.started = True
        schema = self._properties.get(key)
        self._stream = is_string_only(schema)
        self._key = key
        self._given.add(key)
        self._start = -1
        self._scan = self._sent = after
        self._literal = 0
        self._look = (-1, 0)
        self.pos = after
        self._state = _State.VALUE
        if self._stream:
            self._deltas.append(self._prefix() + json.dumps(key, ensure_ascii=False) + ': "')

    def _prefix(self) -> str:
        self._count += 1
        return "{" if self._count == 1 else ", "

    # ---- inside a value

    def _value(self, buf: str, final: bool) -> bool:
        """Read on in the value; True once it has ended (the state has moved on)."""
        n = len(buf)
        if self._start < 0:
            if self.pos == n and not final:
                return False  # the template's newline may still come
            self._start = self.pos + 1 if buf.startswith("\n", self.pos) else self.pos
            self._scan = self._sent = self._start
        i = self._scan
        while True:
            lt = buf.find("<", i)
            if lt < 0:
                self._scan = n
                if final:
                    return False  # never closed: the caller decides what the text is
                self._send(buf, n)
                return False
            verdict = self._tag(buf, lt, final)
            if verdict is None:  # undecided until more text comes
                self._scan = lt
                self._send(buf, lt)
                return False
            if verdict < 0:  # part of the value
                i = lt + 1
                continue
            self._close(buf, lt, verdict)
            return True

    def _tag(self, buf: str, lt: int, final: bool) -> int | None:
        """What the `<` at `lt` does: -1 part of the value (after any literal-depth change),
        None undecided, else it ends the value and reading goes on from the returned position."""
        if self._literal:
            if buf.startswith(FUNCTION_END, lt):
                self._literal -= 1
                return -1
            if is_partial(buf, lt, FUNCTION_END) and not final:
                return None
            return self._nested_open(buf, lt, final)
        if buf.startswith(_PARAMETER_STEM, lt) or is_partial(buf, lt, _PARAMETER_STEM):
            return self._close_tag(buf, lt, final)
        if buf.startswith(PARAMETER_TAG, lt) or is_partial(buf, lt, PARAMETER_TAG):
            return self._next_parameter(buf, lt, final)
        if buf.startswith(FUNCTION_END, lt) or is_partial(buf, lt, FUNCTION_END):
            return self._follows(buf, lt, FUNCTION_END, (CLOSE_TAG, OPEN_TAG, FUNCTION_TAG), final)
        if buf.startswith(CLOSE_TAG, lt) or is_partial(buf, lt, CLOSE_TAG):
            return self._follows(buf, lt, CLOSE_TAG, (OPEN_TAG,), final)
        return self._nested_open(buf, lt, final)

    def _close_tag(self, buf: str, lt: int, final: bool) -> int | None:
        """Rule 1: `</parameter>` or a drifted close, judged by what follows it."""
        n = len(buf)
        stem = lt + len(_PARAMETER_STEM)
        if stem > n:
            return -1 if final else None
        end = stem
        limit = min(n, stem + _DRIFT)
        while end < limit and buf[end] not in "<> \t\r\n":
            end += 1
        if end < n and buf[end] == ">":
            end += 1
        elif end == n and not final:
            return None  # the tag may go on
        j = self._skip_after(buf, lt, end)
        if j == n:
            return self._at_end(end, final)
        if buf.startswith(PARAMETER_TAG, j):
            tag = read_tag_name(buf, j + len(PARAMETER_TAG), MAX_NAME, final)
            if tag is None:
                return None
            return end if tag[0] and self._is_parameter(tag[0]) else -1
        if buf.startswith(FUNCTION_END, j) or buf.startswith(CLOSE_TAG, j):
            return end
        if not final and any(
            is_partial(buf, j, t) for t in (PARAMETER_TAG, FUNCTION_END, CLOSE_TAG)
        ):
            return None
        return -1

    def _next_parameter(self, buf: str, lt: int, final: bool) -> int | None:
        """Rule 2: a line starting `<parameter=K>` for a parameter not given yet."""
        if lt == 0 or buf[lt - 1] != "\n":
            return -1
        if is_partial(buf, lt, PARAMETER_TAG):
            return -1 if final else None
        tag = read_tag_name(buf, lt + len(PARAMETER_TAG), MAX_NAME, final)
        if tag is None:
            return None
        key = tag[0]
        if key and key not in self._given and self._is_parameter(key):
            return lt
        return -1

    def _follows(
        self, buf: str, lt: int, tag: str, followers: tuple[str, ...], final: bool
    ) -> int | None:
        """Rule 3: `</function>` / `</tool_call>` in a value whose close is missing."""
        n = len(buf)
        if n - lt < len(tag):
            return -1 if final else None
        j = self._skip_after(buf, lt, lt + len(tag))
        if j == n:
            return self._at_end(lt, final)
        if any(buf.startswith(f, j) for f in followers):
            return lt
        if not final and any(is_partial(buf, j, f) for f in followers):
            return None
        return -1

    def _nested_open(self, buf: str, lt: int, final: bool) -> int | None:
        """Rule 4: `<function=NAME>` ending a line opens a literal level."""
        if is_partial(buf, lt, FUNCTION_TAG):
            return -1 if final else None
        if not buf.startswith(FUNCTION_TAG, lt):
            return -1
        tag = read_tag_name(buf, lt + len(FUNCTION_TAG), MAX_NAME, final)
        if tag is None:
            return None
        name, after = tag
        if not name:
            return -1
        if after == len(buf):
            return -1 if final else None
        if buf[after] == "\n":
            self._literal += 1
        return -1

    def _at_end(self, close: int, final: bool) -> int | None:
        """A closing tag followed only by the end of the text: it closes the value if the
        model ended the text there; cut by max_tokens, what followed is unknown."""
        if not final:
            return None
        return close if self._ended else -1

    def _skip_after(self, buf: str, lt: int, start: int) -> int:
        """Skip whitespace from `start`, resuming where the last look at the tag at `lt` got
        to (a long run of whitespace arriving in pieces is skipped once)."""
        tag, got = self._look
        j = skip_ws(buf, got if tag == lt else start)
        self._look = (lt, j)
        return j

    def _is_parameter(self, key: str) -> bool:
        return key in self._known if self._known else is_name_like(key)

    def _send(self, buf: str, safe: int) -> None:
        """Stream a string value up to `safe`, holding back one final newline (the
        template's, if the value ends right after it)."""
        if not self._stream:
            return
        if safe > self._sent and buf[safe - 1] == "\n":
            safe -= 1
        if safe > self._sent:
            self._deltas.append(_escape(buf[self._sent : safe]))
            self._sent = safe

    def _close(self, buf: str, end: int, resume: int) -> None:
        """The value ends at `end` (its closing markup, if any, is before `resume`)."""
        value = buf[self._start : end] if end > self._start else ""
        if value.endswith("\n"):
            value = value[:-1]
        if self._stream:
            rest = buf[self._sent : self._start + len(value)] if end > self._start else ""
            self._deltas.append(_escape(rest) + '"')
        else:
            schema = self._properties.get(self._key)
            typed = convert_parameter_value(value, schema if isinstance(schema, Mapping) else None)
            self._deltas.append(
                self._prefix()
                + json.dumps(self._key, ensure_ascii=False)
                + ": "
                + json.dumps(typed, ensure_ascii=False)
            )
        self.pos = resume
        self._state = _State.PARAMS
