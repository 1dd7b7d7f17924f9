"""The server's thinking router: a `<tool_call>` written inside thinking is a draft when
`</think>` or more thinking follows it, and the answer's when the text ends without `</think>`
(issue 20's phantom calls); every cut of the text gives the same split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from qwenrun.serve.answer_router import AnswerRouter
from qwenrun.serve.toolcalls import parse_tool_calls
from qwenrun.thinking import Answer, Thinking

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def call(city: str) -> str:
    return (
        f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n"
        "</function>\n</tool_call>"
    )


def route(
    pieces: Sequence[str], *, tools: bool = True, opened: bool = True
) -> tuple[str, str, int]:
    """(thinking, answer, times on_answer fired) of a text fed in these pieces."""
    fired: list[int] = []
    router = AnswerRouter(opened=opened, divert_tool_calls=tools, on_answer=lambda: fired.append(1))
    events = [e for p in pieces for e in router.feed(p)] + router.flush()
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    return thinking, answer, len(fired)


def every_cut(text: str, **kw: Any) -> tuple[str, str, int]:
    """The split of the text, checked to be the same however it is cut in two or in
    characters."""
    whole = route([text], **kw)
    for at in range(len(text) + 1):
        assert route([text[:at], text[at:]], **kw) == whole, at
    assert route(list(text), **kw) == whole
    return whole


DRAFT = "I'll check it.\n" + call("Paris") + "\n</think>\n\nIt is sunny."


def test_a_call_drafted_before_think_closes_is_thinking() -> None:
    thinking, answer, fired = every_cut(DRAFT)
    assert thinking == "I'll check it.\n" + call("Paris")  # whole, nothing glued
    assert answer == "It is sunny."
    assert fired == 1  # the thinking closed as usual: a forced answer opening would go here
    assert parse_tool_calls(answer, TOOLS, model_ended=True) == ("It is sunny.", [])


def test_a_draft_then_the_real_call_gives_one_call() -> None:
    text = "Plan: " + call("Paris") + " then answer.\n</think>\n\n" + call("Paris")
    thinking, answer, _ = every_cut(text)
    assert call("Paris") in thinking and thinking.endswith("then answer.")
    _, calls = parse_tool_calls(answer, TOOLS, model_ended=True)
    assert [c.arguments for c in calls] == [{"city": "Paris"}]  # not twice


def test_more_thinking_after_the_call_makes_it_a_draft_at_once() -> None:
    router = AnswerRouter(opened=True, divert_tool_calls=True)
    assert router.feed("Maybe " + call("Rome")) == [Thinking("Maybe")]
    assert router.in_thinking  # held, not yet decided: still thinking
    events = router.feed("\nNo, first I should ask.")
    assert events == [Thinking(" " + call("Rome") + "\n"), Thinking("No, first I should ask.")]
    thinking, answer, _ = every_cut("Maybe " + call("Rome") + "\nNo, ask.\n</think>\n\nWhich?")
    assert thinking == "Maybe " + call("Rome") + "\nNo, ask." and answer == "Which?"


def test_a_call_in_thinking_that_never_closes_is_the_answer() -> None:
    # Qwen3.5 at times calls without closing its thinking: the text ends after the calls.
    text = "Let me check.\n" + call("Oslo") + "\n" + call("Bergen") + "\n"
    thinking, answer, fired = every_cut(text)
    assert thinking == "Let me check."
    assert fired == 0  # no answer opening is forced into a call the model already writes
    _, calls = parse_tool_calls(answer, TOOLS, model_ended=True)
    assert [c.arguments for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]


def test_the_held_call_is_thinking_while_undecided() -> None:
    router = AnswerRouter(opened=True, divert_tool_calls=True)
    router.feed("Hmm <tool_call>\n<function=get_weather>\n")
    assert router.in_thinking
    assert router.flush() == [Answer(" <tool_call>\n<function=get_weather>")]
    assert not router.in_thinking


def test_the_tag_named_in_prose_is_thinking_at_once() -> None:
    # Not followed by a call's form: nothing is held back until `</think>`.
    router = AnswerRouter(opened=True, divert_tool_calls=True)
    assert router.feed("Calls go in <tool_call>") == [Thinking("Calls go in")]
    released = router.feed(" tags, then")
    assert "".join(e.text for e in released if isinstance(e, Thinking)) == " <tool_call> tags, then"
    thinking, answer, _ = every_cut("Use <tool_call> tags.\nFine.\n</think>\n\nOK")
    assert thinking == "Use <tool_call> tags.\nFine." and answer == "OK"
    thinking, answer, _ = every_cut("Use <tool_call>\n<function\nno.")  # ended, no call form
    assert (thinking, answer) == ("Use <tool_call>\n<function\nno.", "")


def test_a_tag_that_is_not_one_stays_thinking() -> None:
    thinking, answer, _ = every_cut("About <tool_calls> and <tool_ x.\n</think>\n\nOK")
    assert thinking == "About <tool_calls> and <tool_ x." and answer == "OK"


def test_without_tools_everything_before_think_closes_is_thinking() -> None:
    thinking, answer, _ = every_cut("x " + call("Oslo"), tools=False)
    assert thinking == "x " + call("Oslo") and answer == ""


@pytest.mark.parametrize("opened", [True, False])
def test_plain_thinking_and_answer_pass_through(opened: bool) -> None:
    text = ("" if opened else "<think>\n") + "a <b> c\n\n</think>\n\nAnswer <tool_call> here"
    thinking, answer, fired = every_cut(text, opened=opened)
    assert (thinking, answer, fired) == ("a <b> c", "Answer <tool_call> here", 1)


def test_json_form_draft() -> None:
    draft = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call>'
    thinking, answer, _ = every_cut("So: " + draft + "</think>Done")
    assert thinking == "So: " + draft and answer == "Done"


def test_a_long_call_held_in_thinking_fed_in_small_pieces() -> None:
    # A long call held inside thinking, fed a few characters at a time, then decided.
    body = "x" * 20_000
    text = "T " + call(body) + "\n</think>\n\nA"
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    thinking, answer, _ = route(pieces)
    assert thinking == "T " + call(body) and answer == "A"


@pytest.mark.slow
def test_fuzz_the_split_never_depends_on_the_cuts() -> None:
    sources = [
        DRAFT,
        "Maybe " + call("Rome") + "\nNo.\n</think>\nX",
        "Let me.\n" + call("Oslo") + "\n" + call("Bergen") + "\n",
        "Use <tool_call> tags.\n</think>\nOK",
        '<tool_call>{"name": "get_weather"}</tool_call>',
    ]
    fragments = ["<tool_call>", "</tool_call>", "</think>", "<think>", "<function=", "{", "\n", " "]
    rng = random.Random(20)
    for _ in range(300):
        text = rng.choice(sources)
        for _ in range(rng.randint(1, 4)):
            a = rng.randint(0, len(text))
            b = rng.randint(a, min(len(text), a + 15))
            kind = rng.randrange(3)
            if kind == 0:
                text = text[:a] + text[b:]
            elif kind == 1:
                text = text[:a] + rng.choice(fragments) + text[a:]
            else:
                text = text[:b] + text[a:b] + text[b:]
        opened = rng.random() < 0.7
        whole = route([text], opened=opened)
        assert route(list(text), opened=opened) == whole, text
        thirds = [text[i : i + 3] for i in range(0, len(text), 3)]
        assert route(thirds, opened=opened) == whole, text
