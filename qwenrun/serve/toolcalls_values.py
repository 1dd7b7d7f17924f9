"""What a request's tools say about a Qwen tool call: which function names exist, which
parameters each takes, and what JSON value a parameter's raw XML text stands for.

Contract: pure, standard library only, never raises on what a model or a client wrote.
`ToolTable(tools)` reads an OpenAI `tools` list (or bare function objects), skipping entries it
cannot read; `convert_parameter_value(text, schema)` types one XML parameter value by its JSON
schema. Used by `toolcalls` (the JSON form and the content around calls) and `toolcalls_xml`
(the XML form).

Typing, where vLLM's qwen3coder parser, SGLang's Qwen3-Coder detector and llama.cpp differ:

- `null` / `None` (any case) is JSON null for every non-string type (vLLM; SGLang even for
  strings), and for a string type only when the schema also allows null: a string parameter
  keeps the word the model wrote (vLLM's reading).
- integer / number: a number written as such; an integer written `3.0` is 3. Text that is no
  number stays the string the model wrote (vLLM and SGLang; neither guesses).
- boolean: `true` / `false` in any case (Qwen3.5's template writes Python's `True`). Anything
  else stays a string; vLLM and SGLang turn it into `false`, which would run the tool with a
  value the model never wrote.
- object / array: JSON first; then, as vLLM does, a Python literal (`{'key': 'value'}`, the
  way Qwen3.5's template renders a mapping) read by `ast.literal_eval` (which evaluates
  nothing) and kept only when it is plain JSON data of the wanted kind; a JSON string holding
  such a literal (double-encoded) is read once more.
- several types (`["integer", "string"]`, `anyOf`): tried in a fixed order, most specific first
  (null, boolean, integer, number, object, array), the string as written when none fits. vLLM
  takes the first non-null type listed instead, so `anyOf: [string, integer]` gives it "42"
  where this gives 42; the order here does not depend on how a schema happens to be written.
- type names: JSON Schema's, plus the aliases the peers accept (`int`, `int64`, `uint`, `long`,
  `float`, `double`, `bool`, `str`, `text`, `varchar`, `enum`, `dict`, `list`, `arr`, ...).
- no usable schema: JSON literals (numbers, true/false/null, objects, arrays) are read as
  JSON and everything else is a string, so `True` or `007` are never guessed at.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_NAME",
    "ToolTable",
    "convert_parameter_value",
    "is_name_like",
    "loads_strict",
]

_WS = " \t\r\n"
# A function or parameter name longer than this is not one: the parsers stop waiting for a
# tag's `>` after this many characters, which keeps what they hold back bounded.
MAX_NAME = 256
# What a name may not contain (vLLM's list, plus control characters): template syntax such as
# `{{ tc.name }}`, quotes, markup and whitespace inside a name mean it is not a real one.
_NAME = re.compile(r"[^\s{}<>\"'`\x00-\x1f\x7f]{1," + str(MAX_NAME) + "}")
# Python literals beyond this size are not read (ast.literal_eval parses the whole text first).
_MAX_LITERAL = 1 << 20


def is_name_like(name: str) -> bool:
    """Whether `name` can be a function or parameter name (not template syntax or prose)."""
    return _NAME.fullmatch(name) is not None


class ToolTable:
    """The request's tools as the parsers need them.

    `names`: every function name offered (None when the request gave no tools, so that any
    name-like name is taken); `properties(name)`: that function's parameter schemas by name
    (empty when it has none or they are unreadable).
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        names: set[str] = set()
        self._properties: dict[str, Mapping[str, Any]] = {}
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                continue
            function = tool.get("function", tool)
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                continue
            name = function["name"]
            names.add(name)
            parameters = function.get("parameters")
            if isinstance(parameters, Mapping):
                properties = parameters.get("properties")
                if isinstance(properties, Mapping):
                    self._properties[name] = properties
        self.names: frozenset[str] | None = frozenset(names) if tools else None

    def is_function(self, name: str) -> bool:
        """Whether a call to `name` is one the request allows (any name-like one without
        tools)."""
        if not is_name_like(name):
            return False
        return self.names is None or name in self.names

    def properties(self, name: str) -> Mapping[str, Any]:
        return self._properties.get(name, {})

    def longest_name(self) -> int:
        """The longest function name offered (MAX_NAME without tools)."""
        if self.names is None:
            return MAX_NAME
        return max((len(n) for n in self.names), default=0)


def is_string_only(schema: Any) -> bool:
    """Whether a parameter's schema makes its value exactly the text written (type string and
    nothing else): such a value can be sent while it is still being written."""
    return isinstance(schema, Mapping) and _schema_types(schema) == {"string"}


# ---- XML parameter values

_EXACT_ALIASES = {
    "str": "string",
    "text": "string",
    "varchar": "string",
    "char": "string",
    "enum": "string",
    "bool": "boolean",
    "binary": "boolean",
    "arr": "array",
    "none": "null",
}
_PREFIX_ALIASES = (
    (("int", "uint", "long", "short", "unsigned"), "integer"),
    (("num", "float", "double", "decimal"), "number"),
    (("dict",), "object"),
    (("list",), "array"),
)
_KNOWN = frozenset({"string", "integer", "number", "boolean", "object", "array", "null"})
# Tried in this order when a schema allows several types, the most specific first: a value
# that reads as one of them is taken as it, else it stays the string the model wrote.
_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array")
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FAIL = object()


def convert_parameter_value(value: str, schema: Mapping[str, Any] | None) -> Any:
    """An XML parameter's raw text (its one template newline on each end already removed) as
    the JSON value the tool expects (see the module contract for each type)."""
    types = _schema_types(schema) if isinstance(schema, Mapping) else set()
    if not types:
        return _guess(value)
    text = value.strip(_WS)
    if types == {"string"}:
        return value
    if "string" not in types and text.lower() in ("null", "none"):
        return None  # a non-string parameter written as null: JSON null, as the peers read it
    for kind in _TYPE_ORDER:
        if kind in types:
            converted = _as_type(text, kind)
            if converted is not _FAIL:
                return converted
    return value


def _type_name(name: str) -> str:
    name = name.strip().lower()
    if name in _KNOWN:
        return name
    if name in _EXACT_ALIASES:
        return _EXACT_ALIASES[name]
    for prefixes, kind in _PREFIX_ALIASES:
        if name.startswith(prefixes):
            return kind
    return name


def _schema_types(schema: Mapping[str, Any], depth: int = 0) -> set[str]:
    kind = schema.get("type")
    names: list[Any] = []
    if isinstance(kind, str):
        names = [kind]
    elif isinstance(kind, list):
        names = kind
    types = {_type_name(n) for n in names if isinstance(n, str)}
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
        return _as_number(text, kind)
    if kind in ("object", "array"):
        return _as_container(text, dict if kind == "object" else list)
    return _FAIL


def _as_number(text: str, kind: str) -> Any:
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


def _as_container(text: str, wanted: type) -> Any:
    try:
        parsed = loads_strict(text)
    except (ValueError, RecursionError):
        parsed = _literal(text)
    if isinstance(parsed, str):
        # A mapping written as the JSON string of its Python repr (a template that did
        # json.dumps(str(d))): read the string once more.
        inner = _literal(parsed)
        parsed = inner if inner is not _FAIL else parsed
    return parsed if isinstance(parsed, wanted) else _FAIL


def _literal(text: str) -> Any:
    """A Python literal as JSON data, or _FAIL. ast.literal_eval evaluates nothing; what it
    builds is kept only when JSON can carry it (tuples become lists)."""
    if len(text) > _MAX_LITERAL:
        return _FAIL
    try:
        value = ast.literal_eval(text.strip(_WS))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL
    return _plain(value, 0)


def _plain(value: Any, depth: int) -> Any:
    if depth > 100:
        return _FAIL
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _FAIL
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return _FAIL if any(v is _FAIL for v in items) else items
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            item = _plain(v, depth + 1)
            if not isinstance(k, str) or item is _FAIL:
                return _FAIL
            out[k] = item
        return out
    return _FAIL  # sets, bytes, complex numbers: not JSON


def _guess(value: str) -> Any:
    text = value.strip(_WS)
    looks_json = (
        text[:1] in ("{", "[")
        or text in ("true", "false", "null")
        or _JSON_NUMBER.fullmatch(text) is not None
    )
    if looks_json:
        try:
            return loads_strict(text)
        except (ValueError, RecursionError):
            pass
    return value


# ---- strict JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def loads_strict(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, which `json.dumps` would write back as invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
