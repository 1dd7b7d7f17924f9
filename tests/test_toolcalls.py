"""Tool-call parsing: both Qwen formats, cut into pieces every way, malformed blocks, schema
typing, and round trips through the real chat templates."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from qwenrun import errors
from qwenrun.serve.toolcalls import (
    CallAborted,
    CallArguments,
    CallDone,
    CallStarted,
    Content,
    Event,
    ToolCall,
    ToolCallParser,
    convert_parameter_value,
    history_tool_calls,
    new_call_id,
    parse_tool_calls,
    tool_call_to_openai,
)
from qwenrun.synthetic.tiny_gguf import template_text
from qwenrun.template import ChatTemplate

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a file.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "count": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "force": {"type": "boolean"},
                    "note": {"type": ["string", "null"]},
                    "options": {"type": "object"},
                    "files": {"type": "array", "items": {"type": "string"}},
                    "code": {"type": "string"},
                },
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
]


def counter_ids() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def merged(events: Sequence[Event]) -> list[Event]:
    """Adjacent Content (and one call's adjacent CallArguments) joined: how events may be cut
    depends on the pieces, what they say must not."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Content) and isinstance(last, Content):
            out[-1] = Content(last.text + e.text)
        elif (
            isinstance(e, CallArguments)
            and isinstance(last, CallArguments)
            and last.index == e.index
        ):
            out[-1] = CallArguments(e.index, last.delta + e.delta)
        else:
            out.append(e)
    return out


def run(pieces: Sequence[str], tools: list[dict[str, Any]] | None = TOOLS) -> list[Event]:
    parser = ToolCallParser(tools, id_factory=counter_ids())
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return events


def content_of(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Content))


def calls_of(events: Sequence[Event]) -> list[ToolCall]:
    return [e.call for e in events if isinstance(e, CallDone)]


def xml_call(name: str, params: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def json_call(name: str, arguments: dict[str, Any]) -> str:
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


# ---- the two formats


def test_json_call_with_content_before() -> None:
    text = "Let me check.\n" + json_call("get_weather", {"city": "Paris"})
    assert run([text]) == [
        Content("Let me check."),
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
        CallDone(0, ToolCall("call_0", "get_weather", '{"city": "Paris"}')),
    ]


def test_xml_call_with_content_before() -> None:
    text = "Let me check.\n\n" + xml_call("get_weather", [("city", "Paris"), ("days", "3")])
    args = '{"city": "Paris", "days": 3}'
    assert merged(run([text])) == [
        Content("Let me check."),
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, args),
        CallDone(0, ToolCall("call_0", "get_weather", args)),
    ]


@pytest.mark.parametrize("form", ["json", "xml"])
def test_several_calls_with_content_before_between_and_after(form: str) -> None:
    def call(city: str) -> str:
        if form == "json":
            return json_call("get_weather", {"city": city})
        return xml_call("get_weather", [("city", city)])

    text = f"First Paris.\n{call('Paris')}\nThen Rome.\n{call('Rome')}\n{call('Oslo')}\nDone."
    events = merged(run([text]))
    assert [type(e) for e in events] == [
        Content,
        *[CallStarted, CallArguments, CallDone],
        Content,
        *[CallStarted, CallArguments, CallDone] * 2,
        Content,
    ]
    # Text on both sides of a call keeps one space between (the call's own whitespace goes).
    assert [e.text for e in events if isinstance(e, Content)] == [
        "First Paris.",
        " Then Rome.",
        " Done.",
    ]
    calls = calls_of(events)
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_0", "get_weather", {"city": "Paris"}),
        ("call_1", "get_weather", {"city": "Rome"}),
        ("call_2", "get_weather", {"city": "Oslo"}),
    ]
    assert [e.index for e in events if isinstance(e, CallStarted)] == [0, 1, 2]


def test_format_is_told_per_block() -> None:
    text = json_call("get_weather", {"city": "Paris"}) + xml_call("get_weather", [("city", "Rome")])
    _, calls = parse_tool_calls(text, TOOLS)
    assert [c.arguments for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]


def test_arguments_deltas_concatenate_to_the_call() -> None:
    text = xml_call("write_file", [("path", "a.py"), ("count", "2")]) + json_call("f", {"x": [1]})
    events = run([text])
    for done in (e for e in events if isinstance(e, CallDone)):
        deltas = [e.delta for e in events if isinstance(e, CallArguments) and e.index == done.index]
        assert "".join(deltas) == done.call.arguments_json
        assert isinstance(json.loads(done.call.arguments_json), dict)


def test_xml_call_is_announced_once_its_structure_is_confirmed() -> None:
    # After `<function=NAME>`, the first `<parameter=` (or `</function>`) confirms the format;
    # a string value then streams as it is written.
    text = xml_call("get_weather", [("city", "Paris"), ("days", "3")])
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    cut = text.index("<parameter=city>") + len("<parameter=city>")
    assert [e for ch in text[:cut] for e in parser.feed(ch)] == [
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, '{"city": "'),
    ]
    streamed = [e for ch in "\nPar" for e in parser.feed(ch)]
    assert "".join(e.delta for e in streamed if isinstance(e, CallArguments)) == "Par"
    rest = merged(parser.feed(text[cut + 4 :]))
    assert rest == [
        CallArguments(0, 'is", "days": 3}'),
        CallDone(0, ToolCall("call_0", "get_weather", '{"city": "Paris", "days": 3}')),
    ]


def test_json_call_is_announced_whole_when_it_ends() -> None:
    text = json_call("get_weather", {"city": "Paris"})
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    assert [e for ch in text[:-1] for e in parser.feed(ch)] == []
    assert parser.feed(text[-1]) == [
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
        CallDone(0, ToolCall("call_0", "get_weather", '{"city": "Paris"}')),
    ]


def test_xml_without_newlines_and_without_parameters() -> None:
    compact = "<tool_call><function=f><parameter=a>1</parameter></function></tool_call>"
    assert parse_tool_calls(compact)[1][0].arguments == {"a": 1}
    bare = "<tool_call>\n<function=list_files>\n</function>\n</tool_call>"
    assert parse_tool_calls(bare)[1][0].arguments_json == "{}"


def test_xml_values_may_hold_closing_tags_of_the_call() -> None:
    code = "if end == '</tool_call>' or end == '</function>':\n    pass"
    _, calls = parse_tool_calls(xml_call("write_file", [("content", code)]), TOOLS)
    assert calls[0].arguments == {"content": code}


def test_json_strings_may_hold_closing_tags_of_the_call() -> None:
    arguments = {"content": 'print("</tool_call>")\n# \\"escaped\\" <tool_call>'}
    content, calls = parse_tool_calls(json_call("write_file", arguments))
    assert content == ""
    assert calls[0].arguments == arguments


def test_json_arguments_variants() -> None:
    def args(body: str) -> str:
        return parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")[1][0].arguments_json

    assert args('{"name": "f", "arguments": "{\\"a\\": 1}"}') == '{"a": 1}'  # encoded twice
    assert args('{"name": "f"}') == "{}"
    assert args('{"name": "f", "arguments": null}') == "{}"
    assert args('{"arguments": {"a": "é"}, "name": "f"}') == '{"a": "é"}'  # name last


def test_xml_string_values_lose_exactly_one_newline_each_side() -> None:
    text = xml_call("write_file", [("content", "\nkeep\n"), ("path", "")])
    assert parse_tool_calls(text, TOOLS)[1][0].arguments == {"content": "\nkeep\n", "path": ""}
    raw = "<tool_call>\n<function=write_file>\n<parameter=content>\n</parameter>\n"
    raw += "</function>\n</tool_call>"
    assert parse_tool_calls(raw, TOOLS)[1][0].arguments == {"content": ""}


def test_xml_values_are_typed_by_the_schema() -> None:
    params = [
        ("path", "42"),
        ("count", "7"),
        ("ratio", "0.5"),
        ("force", "True"),
        ("note", "None"),
        ("options", '{"depth": 2}'),
        ("files", '["a", "b"]'),
    ]
    _, calls = parse_tool_calls(xml_call("write_file", params), TOOLS)
    assert calls[0].arguments == {
        "path": "42",
        "count": 7,
        "ratio": 0.5,
        "force": True,
        "note": None,
        "options": {"depth": 2},
        "files": ["a", "b"],
    }


def test_xml_values_without_a_schema_are_read_as_json_literals_only() -> None:
    params = [("n", "7"), ("b", "true"), ("o", '{"a": 1}'), ("s", "hello"), ("py", "True")]
    for tools in (None, [{"type": "function", "function": {"name": "unknown"}}]):
        _, calls = parse_tool_calls(xml_call("unknown", params), tools)
        assert calls[0].arguments == {"n": 7, "b": True, "o": {"a": 1}, "s": "hello", "py": "True"}


def test_repeated_xml_parameter_keeps_the_last_value() -> None:
    # Each value streams as written, so the key appears twice; JSON readers keep the last.
    text = xml_call("get_weather", [("city", "Paris"), ("city", "Rome")])
    call = parse_tool_calls(text, TOOLS)[1][0]
    assert call.arguments_json == '{"city": "Paris", "city": "Rome"}'
    assert call.arguments == {"city": "Rome"}


@pytest.mark.parametrize(
    ("value", "schema", "expected"),
    [
        ("42", {"type": "integer"}, 42),
        (" -7\n", {"type": "integer"}, -7),
        ("3.0", {"type": "integer"}, 3),
        ("3.5", {"type": "integer"}, "3.5"),
        ("many", {"type": "integer"}, "many"),
        ("2.5", {"type": "number"}, 2.5),
        ("10", {"type": "number"}, 10),
        ("1e3", {"type": "number"}, 1000.0),
        ("nan", {"type": "number"}, "nan"),
        ("inf", {"type": "number"}, "inf"),
        ("True", {"type": "boolean"}, True),
        ("false", {"type": "boolean"}, False),
        ("yes", {"type": "boolean"}, "yes"),
        ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
        ("{not json", {"type": "object"}, "{not json"),
        ("[1]", {"type": "object"}, "[1]"),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("None", {"type": ["string", "null"]}, None),
        ("null", {"type": ["string", "null"]}, None),
        ("hi", {"type": ["string", "null"]}, "hi"),
        ("42", {"type": "string"}, "42"),
        (" padded ", {"type": "string"}, " padded "),
        ("5", {"type": "int"}, 5),
        ("2", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 2),
        ("b", {"enum": ["a", "b"]}, "b"),
        ("2", {"enum": [1, 2]}, 2),
        ("42", None, 42),
        ("-0.5e2", None, -50.0),
        ("true", None, True),
        ("null", None, None),
        ("True", None, "True"),
        ("007", None, "007"),
        ("NaN", None, "NaN"),
        ('{"a": 1}', None, {"a": 1}),
        ("[1, 2", None, "[1, 2"),
        ('"quoted"', None, '"quoted"'),
        ("", None, ""),
        ("42", {"description": "no type"}, 42),
    ],
)
def test_convert_parameter_value(value: str, schema: dict[str, Any] | None, expected: Any) -> None:
    result = convert_parameter_value(value, schema)
    assert result == expected
    assert type(result) is type(expected)


# ---- every way of cutting the text

SAMPLES = {
    "json calls": "Sure.\n"
    + json_call("get_weather", {"city": "Zürich"})
    + "\n"
    + json_call("write_file", {"path": "a", "content": "x</tool_call>y"}),
    "xml calls": "Sure.\n\n"
    + xml_call("write_file", [("path", "a.py"), ("content", "\nline\n\n"), ("count", "2")])
    + "\n"
    + xml_call("get_weather", [("city", "Rome")])
    + "\n\nAll done.",
    "lookalikes": "a < b, <tool_ and <tool_call> is a tag; <tool_callx> too <tool_call",
    "broken then good": "Try: <tool_call>\n{bad json}\n</tool_call>\n"
    + xml_call("get_weather", [("city", "Oslo")]),
    "unclosed": "Text <tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
    "unclosed then good": "<tool_call>\n<function=a>\n<parameter=x>\n1\n</tool_call>\n"
    + xml_call("get_weather", [("city", "Oslo")]),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_cut_gives_the_same_events(name: str) -> None:
    text = SAMPLES[name]
    whole = merged(run([text]))
    for at in range(len(text) + 1):
        assert merged(run([text[:at], text[at:]])) == whole, f"cut at {at}"
    assert merged(run(list(text))) == whole
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(2, 8))))
        pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
        assert merged(run(pieces)) == whole, f"cuts {cuts}"


def test_partial_tag_is_held_back_and_released_when_it_is_not_one() -> None:
    parser = ToolCallParser()
    assert parser.feed("x <tool_") == [Content("x")]
    assert parser.feed("box") == [Content(" <tool_box")]
    assert parser.feed(" <") == []
    assert parser.finish() == [Content(" <")]


def test_streaming_never_leaks_a_tag_as_content() -> None:
    text = (
        "Hi "
        + json_call("get_weather", {"city": "Paris"})
        + xml_call("get_weather", [("days", "1")])
    )
    events = run(list(text))
    assert content_of(events) == "Hi"
    assert len(calls_of(events)) == 2


# ---- malformed blocks come back as content

# Each fails for the reason its name gives: the function is one of the request's tools.
MALFORMED = {
    "bad json": '<tool_call>\n{"name": "get_weather", "arguments": {oops}}\n</tool_call>',
    "no name": '<tool_call>\n{"arguments": {}}\n</tool_call>',
    "name not a string": '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    "unknown function": '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>',
    "template syntax as name": "<tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>",
    "arguments not an object": '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n'
    "</tool_call>",
    "NaN argument": '<tool_call>\n{"name": "get_weather", "arguments": {"x": NaN}}\n</tool_call>',
    "junk after json": '<tool_call>\n{"name": "get_weather", "arguments": {}} and more\n'
    "</tool_call>",
    "json not closed": '<tool_call>\n{"name": "get_weather", "arguments": {"x": 1}}',
    "function tag not closed": "<tool_call>\n<function=get_weather\n<parameter=city>\n1\n"
    "</parameter>\n</function>\n</tool_call>",
    "empty function name": "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "newline in function name": "<tool_call>\n<function=get\nweather>\n</function>\n</tool_call>",
    "parameter tag not closed": "<tool_call>\n<function=get_weather>\n<parameter=city\n1\n"
    "</parameter>\n</function>\n</tool_call>",
    "text between parameters": "<tool_call>\n<function=get_weather>\nhello\n</function>\n"
    "</tool_call>",
    "xml value not closed": "<tool_call>\n<function=get_weather>\n<parameter=city>\n1\n",
    "bare function, not a tool": "<function=delete_all>\n</function>",
    "tag in prose": "Wrap calls in <tool_call> tags.",
    "empty block": "<tool_call></tool_call>",
    "only the tag": "<tool_call>",
    "other format": '<tool_call>\n[{"name": "get_weather"}]\n</tool_call>',
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_block_comes_back_verbatim(name: str) -> None:
    text = "Before\n" + MALFORMED[name] + "\nAfter "
    events = run([text])
    assert content_of(events) == text
    assert calls_of(events) == []
    started = [e.index for e in events if isinstance(e, CallStarted)]
    assert [e.index for e in events if isinstance(e, CallAborted)] == started
    assert merged(run(list(text))) == merged(events)
    # The model ending its text there changes nothing: none of these is a whole call.
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    whole = parser.feed(text) + parser.finish(model_ended=True)
    assert content_of(whole) == text and calls_of(whole) == []


def test_text_after_function_makes_the_call_whole() -> None:
    # `</tool_call>` missing but the model moved on: the call stands, the text is content.
    for text in (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "</function>\nmore\n</tool_call>",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "</function>\nAfter ",
    ):
        content, calls = parse_tool_calls("Before\n" + text, TOOLS)
        assert [c.arguments for c in calls] == [{"city": "Oslo"}]
        assert content.startswith("Before more") or content == "Before After "


def test_a_cut_call_is_aborted_after_its_streamed_pieces() -> None:
    # Cut short (max_tokens) after a whole call: its index is spent, its text is content, and
    # its streamed arguments never close.
    first = xml_call("get_weather", [("city", "A")])
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nB"
    assert merged(run([first + "\n" + cut])) == [
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, '{"city": "A"}'),
        CallDone(0, ToolCall("call_0", "get_weather", '{"city": "A"}')),
        CallStarted(1, "call_1", "get_weather"),
        CallArguments(1, '{"city": "B'),
        CallAborted(1),
        Content(cut),
    ]


def test_good_call_after_an_unclosed_one_is_found() -> None:
    text = '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n' + json_call("b", {"y": 2})
    content, calls = parse_tool_calls(text, id_factory=counter_ids())
    assert content == '<tool_call>\n{"name": "a", "arguments": {"x": 1}'
    assert calls == [ToolCall("call_0", "b", '{"y": 2}')]


def test_unclosed_call_at_finish() -> None:
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    text = "Checking.\n" + xml_call("get_weather", [("city", "Paris")])[:-3]
    assert merged(parser.feed(text)) == [
        Content("Checking."),
        CallStarted(0, "call_0", "get_weather"),
        CallArguments(0, '{"city": "Paris"'),
    ]
    # Cut (max_tokens): the call is text, from the whitespace before it on.
    assert merged(parser.finish()) == [CallAborted(0), Content(text[len("Checking.") :])]
    assert parser.finish() == []
    with pytest.raises(ValueError):
        parser.feed("more")


# ---- whitespace and plain text


def test_whitespace_touching_calls_is_dropped_and_other_text_kept() -> None:
    call = json_call("f", {})
    assert parse_tool_calls(f"\n\n{call}\n\n{call}\n\n")[0] == ""
    assert parse_tool_calls(f"A \n{call}\n B")[0] == "A B"  # one space keeps them apart
    assert parse_tool_calls(f"{call}\n B")[0] == "B"  # nothing before: nothing to keep apart
    plain = "  Hello,\n\n  world <b>x</b> \n"
    assert parse_tool_calls(plain) == (plain, [])
    assert merged(run(list(plain))) == [Content(plain)]


def test_bad_tools_never_raise() -> None:
    tools: Any = [{"type": "function"}, "junk", {"function": {"name": "f", "parameters": []}}]
    _, calls = parse_tool_calls(xml_call("f", [("a", "1")]), tools)
    assert calls[0].arguments == {"a": 1}


def test_default_ids_are_openai_style_and_unique() -> None:
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    _, calls = parse_tool_calls(json_call("f", {}) + json_call("f", {}))
    assert calls[0].id != calls[1].id
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", calls[0].id)


# ---- OpenAI shapes


def test_tool_call_to_openai() -> None:
    assert tool_call_to_openai(ToolCall("call_x", "f", '{"a": 1}')) == {
        "id": "call_x",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1}'},
    }


def test_history_tool_calls() -> None:
    openai = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"type": "function", "function": {"name": "g", "arguments": ""}},
        {"type": "function", "function": {"name": "h", "arguments": {"b": [2]}}},
    ]
    assert history_tool_calls(openai) == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
        {"type": "function", "function": {"name": "g", "arguments": {}}},
        {"type": "function", "function": {"name": "h", "arguments": {"b": [2]}}},
    ]
    for bad in ("{oops", "[1, 2]", 3):
        with pytest.raises(ValueError, match=r"tool_calls\[0\]"):
            history_tool_calls([{"function": {"name": "f", "arguments": bad}}])
    with pytest.raises(ValueError, match="no function name"):
        history_tool_calls([{"type": "function", "function": {"arguments": "{}"}}])


# ---- round trips through the real templates


def render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """As the project renders a GGUF's template (and as the server does, with its tools)."""
    source = template_text(template.removesuffix(".jinja"))
    return ChatTemplate(source).render(messages, enable_thinking=True, tools=tools)


def assistant_text(prompt: str) -> str:
    """What the model would have written for the first assistant turn: the text after the
    generation prompt `<|im_start|>assistant\\n` (and the thinking block) up to `<|im_end|>`."""
    start = prompt.index("<|im_start|>assistant") + len("<|im_start|>assistant")
    text = prompt[start : prompt.index("<|im_end|>", start)].removeprefix("\n")
    if text.startswith("<think>"):
        text = text[text.index("</think>") + len("</think>") :].lstrip("\n")
    return text


WRITE_ARGS: dict[str, Any] = {
    "path": "src/main.py",
    "content": "\ndef f():\n    return '</tool_call>'\n\n",
    "count": 3,
    "ratio": 0.25,
    "force": True,
    "note": None,
    "options": {"depth": 2, "tags": ["a", "b"]},
    "files": ["a.txt", "b.txt"],
    "code": "007",
}
OPENAI_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "write_file", "arguments": json.dumps(WRITE_ARGS)},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
    },
]
FORMATS = {"qwen3.jinja": "json", "qwen3.5.jinja": "xml", "qwen3-coder.jinja": "xml"}


def conversation(content: str, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Write the file, then tell me the weather."},
        {"role": "assistant", "content": content, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "written"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
    ]


@pytest.mark.parametrize("content", ["Let me do that.", ""])
@pytest.mark.parametrize("template", sorted(FORMATS))
def test_round_trip_through_the_template(template: str, content: str) -> None:
    messages = conversation(content, history_tool_calls(OPENAI_CALLS))
    answer = assistant_text(render(template, messages, TOOLS))
    if FORMATS[template] == "xml":
        assert "<function=write_file>\n<parameter=path>\nsrc/main.py\n</parameter>" in answer
    else:
        assert '<tool_call>\n{"name": "write_file", "arguments": {"path": ' in answer
    for pieces in ([answer], list(answer)):
        events = run(pieces)
        assert content_of(events) == content
        calls = calls_of(events)
        assert [(c.name, c.arguments) for c in calls] == [
            ("write_file", WRITE_ARGS),
            ("get_weather", {"city": "Zürich"}),
        ]


def test_qwen35_without_a_schema_keeps_python_spellings_as_strings() -> None:
    # Qwen3.5's template writes scalars with `|string`: Python's True and None. Only the
    # request's schema can say they were a boolean and a null.
    messages = conversation("", history_tool_calls(OPENAI_CALLS[:1]))
    answer = assistant_text(render("qwen3.5.jinja", messages, TOOLS))
    assert "<parameter=force>\nTrue\n</parameter>" in answer
    assert "<parameter=note>\nNone\n</parameter>" in answer
    _, calls = parse_tool_calls(answer)  # no tools
    assert calls[0].arguments == {**WRITE_ARGS, "force": "True", "note": "None", "code": "007"}


@pytest.mark.parametrize("template", ["qwen3.5.jinja", "qwen3-coder.jinja"])
def test_xml_templates_need_arguments_as_a_mapping(template: str) -> None:
    # Why history_tool_calls exists: OpenAI's string arguments break `|items`.
    messages = conversation("", OPENAI_CALLS)
    with pytest.raises(errors.InvalidModelError, match="mapping"):
        render(template, messages, TOOLS)


def test_qwen3_pastes_string_arguments_as_they_are() -> None:
    raw = conversation("", OPENAI_CALLS)
    converted = conversation("", history_tool_calls(OPENAI_CALLS))
    # A mapping goes through tojson; the wire string is pasted: same calls either way.
    for messages in (raw, converted):
        _, calls = parse_tool_calls(assistant_text(render("qwen3.jinja", messages, TOOLS)))
        assert [c.arguments for c in calls] == [WRITE_ARGS, {"city": "Zürich"}]
