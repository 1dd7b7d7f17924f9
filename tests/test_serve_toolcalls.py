"""Issue 20's tool-call classes through the real server, streamed and not: wrong arguments,
calls that should not exist, calls lost to content, arguments streamed as they are written.

A tool call cannot come out of random weights, so the model is made to write a given text
where its answer begins (`qwenrun.testing.served.prefilled`, through
`ServedModel.answer_prefill`), which the engine decodes token by token
(`Generation.force_text`) exactly as if it had sampled it. From there everything is real:
llama.cpp's tokens, the thinking router, the stop strings, the tool-call parser, the finish
reason and the SSE stream the `openai` client reads. The models end every answer right after
the forced text (eos_bias), except the endless one, which never stops by itself."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from qwenrun.testing.served import TIMEOUT, Running, prefilled, serving

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "What is the weather in Dallas?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
]
DIRECT = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def xml_model(tiny_models) -> Iterator[Running]:
    """Qwen3.5's template (XML calls); every answer ends right after the forced text."""
    with serving(tiny_models("qwen35moe", steer=1, eos_bias=10.0), ctx=4096) as running:
        yield running


@pytest.fixture(scope="module")
def json_model(tiny_models) -> Iterator[Running]:
    """Qwen3's template (JSON calls); every answer ends right after the forced text."""
    with serving(tiny_models("qwen3moe", steer=1, eos_bias=10.0), ctx=4096) as running:
        yield running


@pytest.fixture(scope="module")
def endless_xml(tiny_models) -> Iterator[Running]:
    """Qwen3.5's template on a model that never stops by itself."""
    with serving(tiny_models("qwen35moe", steer=2), ctx=4096) as running:
        yield running


@dataclass
class Reply:
    content: str
    reasoning: str
    calls: list[tuple[str, dict[str, Any]]]  # the whole calls
    finish: str
    partial: list[str]  # streamed: argument texts of calls that never completed


def ask_whole(running: Running, **kw: Any) -> Reply:
    reply = running.client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, extra_body=DIRECT, **kw
    )
    choice = reply.choices[0]
    message = choice.message
    extra = message.model_extra or {}
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]
    for c in message.tool_calls or ():
        assert c.type == "function" and c.id.startswith("call_")
    return Reply(
        message.content or "", extra.get("reasoning_content") or "", calls, choice.finish_reason, []
    )


def ask_streamed(running: Running, **kw: Any) -> Reply:
    stream = running.client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, extra_body=DIRECT, stream=True, **kw
    )
    content, reasoning, finish = "", "", ""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for tc in delta.tool_calls or ():
            if tc.index not in calls:  # the first piece of a call: its id and name
                assert tc.id and tc.function and tc.function.name
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:
                assert not tc.id
            if tc.function and tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
        if choice.finish_reason:
            finish = choice.finish_reason
    whole, partial = [], []
    for index in sorted(calls):
        call = calls[index]
        try:
            whole.append((call["name"], json.loads(call["arguments"])))
        except ValueError:
            partial.append(call["arguments"])
    return Reply(content, reasoning, whole, finish, partial)


def ask(running: Running, text: str, **kw: Any) -> Reply:
    """The same forced answer asked for whole and streamed: both must say the same."""
    with prefilled(running, text):
        whole = ask_whole(running, **kw)
        streamed = ask_streamed(running, **kw)
    assert (streamed.content, streamed.reasoning, streamed.calls, streamed.finish) == (
        whole.content,
        whole.reasoning,
        whole.calls,
        whole.finish,
    )
    whole.partial = streamed.partial
    return whole


def xml_call(name: str, *params: tuple[str, str], close: bool = True) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    text = f"<tool_call>\n<function={name}>\n{body}</function>\n"
    return text + "</tool_call>" if close else text


# ---- wrong arguments


def test_missing_and_drifted_closes_end_the_value_where_the_peers_do(xml_model):
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nDallas\n"
        "<parameter=days>\n3\n</parameter1>\n</function>\n</tool_call>"
    )
    reply = ask(xml_model, text)
    assert reply.calls == [("get_weather", {"city": "Dallas", "days": 3})]
    assert (reply.content, reply.finish) == ("", "tool_calls")


def test_a_value_holding_a_whole_call_stays_whole(xml_model):
    code = (
        "EXAMPLE = '''<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n</function>\n</tool_call>'''\nassert parse(EXAMPLE)"
    )
    reply = ask(xml_model, xml_call("write_file", ("path", "t.py"), ("content", code)))
    assert reply.calls == [("write_file", {"path": "t.py", "content": code})]


def test_json_parameters_key(json_model):
    text = '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n</tool_call>'
    reply = ask(json_model, text)
    assert reply.calls == [("get_weather", {"city": "Oslo"})]


# ---- calls that should not exist


def test_a_call_drafted_in_thinking_is_reasoning_not_a_call(xml_model):
    draft = xml_call("get_weather", ("city", "Dallas"))
    text = "<think>\nI'll check it.\n" + draft + "\n</think>\n\nIt is sunny."
    reply = ask(xml_model, text)
    assert reply.calls == [] and reply.partial == []
    assert reply.reasoning == "I'll check it.\n" + draft
    assert (reply.content, reply.finish) == ("It is sunny.", "stop")


def test_a_template_syntax_name_is_content(xml_model):
    text = "<tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>"
    reply = ask(xml_model, text)
    assert (reply.calls, reply.partial, reply.content) == ([], [], text)


# ---- calls lost to content


def test_a_bare_function_with_an_orphan_closer_is_a_call(xml_model):
    text = (
        "<function=get_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n</tool_call>"
    )
    reply = ask(xml_model, text)
    assert (reply.calls, reply.content) == ([("get_weather", {"city": "Dallas"})], "")


def test_two_functions_in_one_block_are_two_calls(xml_model):
    one = "<function=get_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n"
    two = "<function=get_weather>\n<parameter=city>\nAustin\n</parameter>\n</function>\n"
    reply = ask(xml_model, "<tool_call>\n" + one + two + "</tool_call>")
    assert reply.calls == [("get_weather", {"city": "Dallas"}), ("get_weather", {"city": "Austin"})]


def test_a_call_in_thinking_that_never_closes_is_a_call(xml_model):
    text = "<think>\nLet me check.\n" + xml_call("get_weather", ("city", "Dallas"))
    reply = ask(xml_model, text)
    assert reply.reasoning == "Let me check."
    assert (reply.calls, reply.content, reply.finish) == (
        [("get_weather", {"city": "Dallas"})],
        "",
        "tool_calls",
    )


def test_end_of_generation_before_the_closer_keeps_the_call(xml_model):
    reply = ask(xml_model, xml_call("get_weather", ("city", "Dallas"), close=False))
    assert (reply.calls, reply.finish) == ([("get_weather", {"city": "Dallas"})], "tool_calls")


def test_a_stop_string_does_not_hide_the_call(xml_model, json_model):
    for running, text in (
        (xml_model, xml_call("get_weather", ("city", "Dallas"))),
        (
            json_model,
            '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>',
        ),
    ):
        reply = ask(running, text + "\nMore words.", stop=["</tool_call>"])
        assert reply.calls and reply.calls[0][0] == "get_weather"
        assert (reply.content, reply.finish) == ("", "tool_calls")


def test_a_call_cut_by_max_tokens_is_never_a_call(xml_model):
    text = xml_call("write_file", ("path", "a.py"), ("content", "print('hello')\n" * 20))
    reply = ask(xml_model, text, max_tokens=120)
    assert reply.finish == "length"
    assert reply.calls == []
    assert reply.content.startswith("<tool_call>\n<function=write_file>")
    # Streamed, the client saw the call begin; its arguments never became JSON.
    assert len(reply.partial) == 1 and reply.partial[0].startswith('{"path": "a.py", "content": "')


# ---- text around a call, arguments as they are written


def test_text_on_both_sides_of_an_inline_call_keeps_a_space(xml_model):
    text = "Let me check it." + xml_call("get_weather", ("city", "Dallas")) + "It is sunny."
    reply = ask(xml_model, text)
    assert reply.content == "Let me check it. It is sunny."
    assert reply.calls == [("get_weather", {"city": "Dallas"})]


def test_string_arguments_arrive_while_the_model_still_writes(endless_xml):
    # The model writes a file's content and never stops: the content is on the client's side
    # long before the generation ends.
    head = (
        "<tool_call>\n<function=write_file>\n<parameter=path>\nnotes.txt\n</parameter>\n"
        "<parameter=content>\nDear diary, today"
    )
    with prefilled(endless_xml, head):
        stream = endless_xml.client.chat.completions.create(
            model="tiny",
            messages=USER,
            tools=TOOLS,
            extra_body=DIRECT,
            stream=True,
            max_tokens=3000,
        )
        arguments, finished = "", False
        for chunk in stream:
            choice = chunk.choices[0] if chunk.choices else None
            if choice is None:
                continue
            finished = finished or choice.finish_reason is not None
            for tc in choice.delta.tool_calls or ():
                arguments += (tc.function.arguments or "") if tc.function else ""
            if "Dear diary, today" in arguments:
                break
        stream.close()
    assert arguments.startswith('{"path": "notes.txt", "content": "Dear diary, today')
    assert not finished
    # The client left: the generation is cancelled, and the engine is free again.
    deadline = time.monotonic() + TIMEOUT
    while not any("cancelled" in line for line in endless_xml.logs):
        assert time.monotonic() < deadline, endless_xml.logs
        threading.Event().wait(0.05)
