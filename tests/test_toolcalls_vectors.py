"""Tool-call vectors in the style of the peers' own tests (vLLM's qwen3coder / qwen3xml /
hermes parser tests, SGLang's Qwen detector tests, llama.cpp's test-chat.cpp) and of the
failure classes of issue 20, each fed whole and in 1-, 3- and random-sized pieces with the same
result; then a seeded fuzz over mutations of them: no input crashes the parser or changes its
result with how it is cut.

The cases are written here from what the peers' tests and issue threads describe; where this
parser reads an input differently from a peer on purpose, the case says so (the module contract
of qwenrun.serve.toolcalls lists those readings)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from qwenrun.serve.toolcalls import (
    CallAborted,
    CallArguments,
    CallDone,
    CallStarted,
    Content,
    Event,
    ToolCallParser,
)


def tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    tool(
        "get_current_weather",
        {
            "city": {"type": "string"},
            "state": {"type": "string"},
            "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
        },
    ),
    tool(
        "calculate_area",
        {
            "shape": {"type": "string"},
            "dimensions": {"type": "object"},
            "precision": {"type": "integer"},
        },
    ),
    tool("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
    tool(
        "test_types",
        {
            "int_param": {"type": "integer"},
            "float_param": {"type": "float"},
            "bool_param": {"type": "boolean"},
            "str_param": {"type": "string"},
            "obj_param": {"type": "object"},
            "num_param": {"type": "number"},
            "arr_param": {"type": "array"},
        },
    ),
    tool(
        "test_anyof",
        {
            "anyof_int": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "anyof_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "anyof_obj": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "type_as_array": {"type": ["integer", "null"]},
            "multi_non_null": {
                "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]
            },
        },
    ),
    tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
    tool("special_function", {"arg1": {"type": "integer"}}),
    tool("list_files", {}),
]


def counter_ids() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def run(pieces: Sequence[str], tools: Any = TOOLS, *, model_ended: bool = True) -> list[Event]:
    parser = ToolCallParser(tools, id_factory=counter_ids())
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish(model_ended=model_ended)


def merged(events: Sequence[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Content) and isinstance(last, Content):
            out[-1] = Content(last.text + e.text)
        elif isinstance(e, CallArguments) and isinstance(last, CallArguments):
            if last.index == e.index:
                out[-1] = CallArguments(e.index, last.delta + e.delta)
            else:
                out.append(e)
        else:
            out.append(e)
    return out


def cuts(text: str, seed: str) -> list[list[str]]:
    """The text whole, in 1- and 3-character pieces, and cut at random places."""
    ways = [[text], list(text), [text[i : i + 3] for i in range(0, len(text), 3)]]
    rng = random.Random(seed)
    for _ in range(6):
        k = min(max(len(text) - 1, 0), rng.randint(1, 12))
        points = sorted(rng.sample(range(1, len(text)), k)) if k else []
        ways.append([text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])])
    return ways


def check_invariants(events: Sequence[Event]) -> None:
    """What holds for any input: indices in order, each started call either done or aborted
    once, a done call's streamed pieces join to its arguments, which are a JSON object."""
    started = [e.index for e in events if isinstance(e, CallStarted)]
    done = [e.index for e in events if isinstance(e, CallDone)]
    aborted = [e.index for e in events if isinstance(e, CallAborted)]
    assert started == list(range(len(started)))
    assert sorted(done + aborted) == started
    for e in events:
        if isinstance(e, CallDone):
            pieces = [
                a.delta for a in events if isinstance(a, CallArguments) and a.index == e.index
            ]
            assert "".join(pieces) == e.call.arguments_json
            assert isinstance(json.loads(e.call.arguments_json), dict)
        if isinstance(e, CallArguments):
            assert e.index in started


@dataclass
class Vector:
    text: str
    content: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    model_ended: bool = True  # True: the model ended its text (EOG); False: cut (max_tokens)
    tools: Any = field(default_factory=lambda: TOOLS)


def xml(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


DALLAS = ("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})
WEATHER_XML = xml(
    "get_current_weather", ("city", "Dallas"), ("state", "TX"), ("unit", "fahrenheit")
)

# Code that writes the XML format itself: tags inside a string value (vLLM's shared tests).
TAGS_IN_CODE = (
    "char_deltas = [\n"
    '    "<tool_call>\\n",\n'
    '    "<parameter=query>\\n",\n'
    '    "\\n</parameter>\\n",\n'
    '    "</function>\\n",\n'
    "]"
)
PARAM_LIKE_LINES = (
    'TOOL_CALL_TEMPLATE = """\n'
    "</parameter>\n"
    "<parameter=new_string>\n"
    "#!/usr/bin/env python3\n"
    "</parameter>\n"
    '"""'
)
WHOLE_CALL_IN_CODE = (
    "def test_parser():\n"
    "    text = '''<tool_call>\n"
    "<function=get_weather>\n"
    "<parameter=city>\n"
    "Paris\n"
    "</parameter>\n"
    "</function>\n"
    "</tool_call>'''\n"
    "    assert parse(text)"
)

VECTORS: dict[str, Vector] = {
    # ---- vLLM qwen3coder / qwen3xml style
    "vllm: single tool": Vector(WEATHER_XML, "", [DALLAS]),
    "vllm: single tool with content": Vector(
        "Sure! Let me check the weather for you." + WEATHER_XML,
        "Sure! Let me check the weather for you.",
        [DALLAS],
    ),
    "vllm: multiline object parameter": Vector(
        xml(
            "calculate_area",
            ("shape", "rectangle"),
            ("dimensions", '{"width": 10, \n "height": 20}'),
            ("precision", "2"),
        ),
        "",
        [
            (
                "calculate_area",
                {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2},
            )
        ],
    ),
    "vllm: parallel tools": Vector(
        WEATHER_XML
        + "\n"
        + xml("get_current_weather", ("city", "Orlando"), ("state", "FL"), ("unit", "celsius")),
        "",
        [DALLAS, ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "celsius"})],
    ),
    "vllm: typed parameters": Vector(
        xml(
            "test_types",
            ("int_param", "42"),
            ("float_param", "3.14"),
            ("bool_param", "true"),
            ("str_param", "hello world"),
            ("obj_param", '{"key": "value"}'),
        ),
        "",
        [
            (
                "test_types",
                {
                    "int_param": 42,
                    "float_param": 3.14,
                    "bool_param": True,
                    "str_param": "hello world",
                    "obj_param": {"key": "value"},
                },
            )
        ],
    ),
    "vllm: anyOf types": Vector(
        xml(
            "test_anyof",
            ("anyof_int", "5"),
            ("anyof_str", "hello"),
            ("anyof_obj", '{"key": "value"}'),
            ("type_as_array", "42"),
            ("multi_non_null", "some text"),
        ),
        "",
        [
            (
                "test_anyof",
                {
                    "anyof_int": 5,
                    "anyof_str": "hello",
                    "anyof_obj": {"key": "value"},
                    "type_as_array": 42,
                    "multi_non_null": "some text",
                },
            )
        ],
    ),
    "vllm: missing </parameter>": Vector(
        "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n"
        "<parameter=city>\nDallas\n<parameter=state>\nTX\n</parameter>\n"
        "<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>",
        "Let me check the weather for you:",
        [DALLAS],
    ),
    "vllm: missing <tool_call>, orphan </tool_call>": Vector(
        "I'll check the weather for you.\n\n<function=get_current_weather>\n"
        "<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n"
        "<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>",
        "I'll check the weather for you.",
        [DALLAS],
    ),
    "vllm: no `>` after the function name": Vector(
        "<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n"
        "</function>\n</tool_call>",
        "<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n"
        "</function>\n</tool_call>",
    ),
    "vllm: a bad block, then a good one (values on one line)": Vector(
        "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n"
        "<parameter=state>TX</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>",
        [("get_current_weather", {"city": "Dallas", "state": "TX"})],
    ),
    "vllm: object not double-encoded": Vector(
        '<tool_call>\n<function=calculate_area>\n<parameter=dimensions>{"key": "value", '
        '"count": 42}</parameter>\n</function>\n</tool_call>',
        "",
        [("calculate_area", {"dimensions": {"key": "value", "count": 42}})],
    ),
    "vllm: object as a Python literal": Vector(
        xml("test_types", ("obj_param", "{'key': 'value'}")),
        "",
        [("test_types", {"obj_param": {"key": "value"}})],
    ),
    "vllm: object as a JSON-encoded Python literal": Vector(
        xml("test_types", ("obj_param", "\"{'key': 'value', 'n': 1}\"")),
        "",
        [("test_types", {"obj_param": {"key": "value", "n": 1}})],
    ),
    "vllm: array holding JSON true": Vector(
        xml("test_types", ("arr_param", '["a", "b", 1, true]')),
        "",
        [("test_types", {"arr_param": ["a", "b", 1, True]})],
    ),
    "vllm: Python None for a nullable integer": Vector(
        xml("test_anyof", ("anyof_int", "None"), ("anyof_str", "None")),
        "",
        [("test_anyof", {"anyof_int": None, "anyof_str": None})],
    ),
    "vllm: XML tags as literal text in a value": Vector(
        xml("write_file", ("path", "test.py"), ("content", TAGS_IN_CODE)),
        "",
        [("write_file", {"path": "test.py", "content": TAGS_IN_CODE})],
    ),
    "vllm: parameter-like lines in a value": Vector(
        xml("write_file", ("path", "test_template.py"), ("content", PARAM_LIKE_LINES)),
        "",
        [("write_file", {"path": "test_template.py", "content": PARAM_LIKE_LINES})],
    ),
    "vllm: two calls in one piece": Vector(
        xml("get_weather", ("city", "Paris")) + "\n" + xml("get_weather", ("city", "London")),
        "",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})],
    ),
    # ---- SGLang Qwen3-Coder detector style
    "sglang: plain text": Vector("This is a test without tools", "This is a test without tools"),
    "sglang: value ends at the next <parameter=": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    "sglang: value ends at </function>": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    "sglang: number read as written": Vector(
        xml("test_types", ("num_param", "5"), ("float_param", "2.5"), ("int_param", "-7")),
        "",
        [("test_types", {"num_param": 5, "float_param": 2.5, "int_param": -7})],
    ),
    "sglang: null for a number is JSON null": Vector(
        xml("test_types", ("num_param", "null"), ("str_param", "null")),
        "",
        # (SGLang makes the string null too; vLLM, and this, keep a string as written.)
        [("test_types", {"num_param": None, "str_param": "null"})],
    ),
    "sglang: two functions in one <tool_call>": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n</function>\n"
        "<function=get_weather>\n<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})],
    ),
    # ---- llama.cpp test-chat style
    "llama.cpp: Qwen3-Coder call": Vector(
        "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n"
        "</function>\n</tool_call>",
        "",
        [("special_function", {"arg1": 1})],
    ),
    "llama.cpp: content, then a call": Vector(
        "Hello, world!\nWhat's up?\n<tool_call>\n<function=special_function>\n"
        "<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>",
        "Hello, world!\nWhat's up?",
        [("special_function", {"arg1": 1})],
    ),
    "llama.cpp: bare Qwen3-Coder call": Vector(
        "<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n",
        "",
        [("special_function", {"arg1": 1})],
    ),
    "llama.cpp: function without parameters": Vector(
        "<tool_call>\n<function=list_files>\n</function>\n</tool_call>", "", [("list_files", {})]
    ),
    "llama.cpp/hermes: JSON call": Vector(
        '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>',
        "",
        [("special_function", {"arg1": 1})],
    ),
    "hermes: JSON call with content and two calls": Vector(
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call>",
        "Checking.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    ),
    "hermes: arguments as a JSON string": Vector(
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n'
        "</tool_call>",
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    "hermes: a JSON string holding </tool_call>": Vector(
        '<tool_call>\n{"name": "write_file", "arguments": {"path": "a", "content": '
        '"x</tool_call>y"}}\n</tool_call>',
        "",
        [("write_file", {"path": "a", "content": "x</tool_call>y"})],
    ),
    # ---- issue 20: wrong arguments
    "issue: missing </parameter> swallows the next one": Vector(
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
        "<parameter=state>\nTX\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_current_weather", {"city": "Dallas", "state": "TX"})],
    ),
    "issue: drifted </parameter1>": Vector(
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter1>\n"
        "<parameter=state>\nTX\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_current_weather", {"city": "Dallas", "state": "TX"})],
    ),
    "issue: a bare </parameter": Vector(
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter\n"
        "<parameter=state>\nTX\n</parameter\n</function>\n</tool_call>",
        "",
        [("get_current_weather", {"city": "Dallas", "state": "TX"})],
    ),
    "issue: a value holding </parameter>": Vector(
        xml("write_file", ("path", "p.py"), ("content", "if end == '</parameter>':\n    stop()")),
        "",
        [("write_file", {"path": "p.py", "content": "if end == '</parameter>':\n    stop()"})],
    ),
    "issue: a value holding a whole call": Vector(
        xml("write_file", ("path", "t.py"), ("content", WHOLE_CALL_IN_CODE)),
        "",
        [("write_file", {"path": "t.py", "content": WHOLE_CALL_IN_CODE})],
    ),
    "issue: JSON with parameters": Vector(
        '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    # ---- issue 20: calls that should not exist
    "issue: template syntax as the name": Vector(
        "Use it like this: <tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>",
        "Use it like this: <tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>",
    ),
    "issue: a function that is not a tool": Vector(
        xml("rm_rf", ("path", "/")), xml("rm_rf", ("path", "/"))
    ),
    "issue: a bare function that is not a tool stays text": Vector(
        "See <function=rm_rf>\n</function> in the docs.",
        "See <function=rm_rf>\n</function> in the docs.",
    ),
    "issue: #include <functional> is text": Vector(
        "#include <functional>\n<function", "#include <functional>\n<function"
    ),
    # ---- issue 20: calls lost to content
    "issue: bare call with orphan </tool_call>, text after": Vector(
        "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n"
        "</tool_call>\nDone.",
        "Done.",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: </tool_call> never came, the model ended (XML)": Vector(
        "Checking.\n" + xml("get_weather", ("city", "Oslo")).removesuffix("</tool_call>"),
        "Checking.",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: the model ended inside </tool_call>": Vector(
        "Checking.\n" + xml("get_weather", ("city", "Oslo")).removesuffix("call>"),
        "Checking. </tool_",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: </function> never came, the model ended": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n",
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: </tool_call> never came, the model ended (JSON)": Vector(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: cut by max_tokens after </function>": Vector(
        xml("get_weather", ("city", "Oslo")).removesuffix("</tool_call>"),
        xml("get_weather", ("city", "Oslo")).removesuffix("</tool_call>"),
        model_ended=False,
    ),
    "issue: cut by max_tokens inside a value": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOs",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOs",
        model_ended=False,
    ),
    "issue: cut by max_tokens after </parameter>": Vector(
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n",
        model_ended=False,
    ),
    "issue: cut JSON": Vector(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
        model_ended=False,
    ),
    "issue: a forced opening and nothing more": Vector(
        "<tool_call>\n<function=get_weather>\n", "<tool_call>\n<function=get_weather>\n"
    ),
    # ---- issue 20: text on both sides of an inline call
    "issue: one space between text around a call": Vector(
        "Let me check it." + xml("get_weather", ("city", "Oslo")) + "It is sunny.",
        "Let me check it. It is sunny.",
        [("get_weather", {"city": "Oslo"})],
    ),
    "issue: whitespace around a call": Vector(
        "Let me check it.\n\n" + xml("get_weather", ("city", "Oslo")) + "\n\nIt is sunny.\n",
        "Let me check it. It is sunny.\n",
        [("get_weather", {"city": "Oslo"})],
    ),
    # ---- no tools in the request: any name-like name, never a bare call
    "no tools: any name-like function": Vector(
        xml("anything", ("n", "7")), "", [("anything", {"n": 7})], tools=None
    ),
    "no tools: a bare function is text": Vector(
        "<function=anything>\n</function>", "<function=anything>\n</function>", tools=None
    ),
}


@pytest.mark.parametrize("name", VECTORS)
def test_vector(name: str) -> None:
    v = VECTORS[name]
    whole = merged(run([v.text], v.tools, model_ended=v.model_ended))
    check_invariants(whole)
    assert "".join(e.text for e in whole if isinstance(e, Content)) == v.content
    calls = [e.call for e in whole if isinstance(e, CallDone)]
    assert [(c.name, c.arguments) for c in calls] == v.calls
    for pieces in cuts(v.text, name):
        events = run(pieces, v.tools, model_ended=v.model_ended)
        check_invariants(events)
        assert merged(events) == whole, [len(p) for p in pieces]


def test_string_arguments_stream_before_the_value_ends() -> None:
    # A long string value shows as it is written (issue 20: "a long write_file shows nothing
    # until it ends"): each line's characters are out before the next line comes.
    head = "<tool_call>\n<function=write_file>\n<parameter=content>\n"
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    events = parser.feed(head)
    assert events == [
        CallStarted(0, "call_0", "write_file"),
        CallArguments(0, '{"content": "'),
    ]
    lines = ["def f():\n", "    return '</parameter>'\n", "# <tool_call> in a comment\n"]
    sent = ""
    for i, line in enumerate(lines):
        sent += "".join(e.delta for e in parser.feed(line) if isinstance(e, CallArguments))
        # All that was written is out but the last newline (the template's, if the value
        # ends right there).
        assert json.loads('"' + sent + '"') == "".join(lines[: i + 1])[:-1]


def test_a_long_value_is_held_back_only_near_markup() -> None:
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    parser.feed("<tool_call>\n<function=write_file>\n<parameter=content>\n")
    out = parser.feed("x = 1\ny = 2 <b> z</parameter")
    text = "".join(e.delta for e in out if isinstance(e, CallArguments))
    assert json.loads('"' + text + '"') == "x = 1\ny = 2 <b> z"  # `</parameter` is undecided
    more = parser.feed(" trailing")  # a drifted close followed by text: part of the value
    assert json.loads(
        '"' + "".join(e.delta for e in more if isinstance(e, CallArguments)) + '"'
    ) == ("</parameter trailing")


# ---- fuzz: mutations of the vectors

FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<function=get_weather>",
    "<function=write_file>\n",
    "<function=",
    "</function>",
    "<parameter=city>",
    "<parameter=days>\n",
    "</parameter>",
    "</parameter1>",
    "</parameter",
    "</think>",
    "<",
    ">",
    "{",
    '"',
    "\\",
    "\n",
    "  ",
    '{"name": "get_weather", "arguments": {',
    "}}",
]


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        n = len(text)
        a = rng.randint(0, n)
        b = rng.randint(a, min(n, a + 20))
        kind = rng.randrange(5)
        if kind == 0:
            text = text[:a] + text[b:]  # delete
        elif kind == 1:
            text = text[:a] + rng.choice(FRAGMENTS) + text[a:]  # insert markup
        elif kind == 2:
            text = text[:b] + text[a:b] + text[b:]  # repeat
        elif kind == 3:
            text = text[:a]  # cut
        else:
            text = text[:a] + text[a:b].upper() + text[b:]
    return text


@pytest.mark.slow
def test_fuzz_never_crashes_and_never_depends_on_the_cuts() -> None:
    rng = random.Random(20)
    sources = [v.text for v in VECTORS.values()]
    for round_ in range(400):
        text = mutate(rng.choice(sources), rng)
        model_ended = rng.random() < 0.5
        tools = TOOLS if rng.random() < 0.8 else None
        whole = merged(run([text], tools, model_ended=model_ended))
        check_invariants(whole)
        for pieces in (list(text), cuts(text, str(round_))[-1]):
            events = run(pieces, tools, model_ended=model_ended)
            check_invariants(events)
            assert merged(events) == whole, (text, pieces)
