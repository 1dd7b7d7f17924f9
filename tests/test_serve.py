"""`qwenrun serve` over HTTP: the official `openai` client and raw HTTP against a real server
(uvicorn on loopback, in a thread of this process) running real llama.cpp on tiny models.

The models have random weights, so what they write is gibberish; steering (tiny_gguf) makes it
safe: steer=1 is ASCII text, steer=2 never stops nor writes special tokens, eos_bias=10 ends
every answer at once. A tool call cannot come out of random weights, so the tool tests force
it: `ServedModel.answer_prefill` makes the engine decode the given text where the answer
begins (`Generation.force_text`, the mechanism the thinking budget and `tool_choice` use).
Everything after that point is real: the tokens go through llama.cpp, the thinking splitter,
the tool-call parser and the SSE stream to the client. The call text itself is taken from the
model's own chat template (an assistant turn with a call, rendered), so it is in the very
format that model was taught.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest

from qwenrun import chat
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.serve import client as remote_client
from qwenrun.serve.enginethread import Worker
from qwenrun.serve.runner import AnswerRouter, ServedModel, StopMatcher
from qwenrun.serve.server import Server, bind, is_loopback
from qwenrun.serve.state import ServerState
from qwenrun.testing.served import TIMEOUT, Running, prefilled, serving
from qwenrun.thinking import Answer, Thinking
from qwenrun.ui import render

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
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
}


@pytest.fixture(scope="module")
def qwen3(tiny_models) -> Iterator[Running]:
    """Qwen3's template (hybrid; the model opens `<think>` itself), ASCII text."""
    with serving(tiny_models("qwen3moe", steer=1)) as running:
        yield running


@pytest.fixture(scope="module")
def qwen35(tiny_models) -> Iterator[Running]:
    """Qwen3.5's template (its prompt opens `<think>`); steer=2: never stops by itself."""
    with serving(tiny_models("qwen35moe", steer=2), ctx=2048) as running:
        yield running


@pytest.fixture(scope="module")
def endless(tiny_models) -> Iterator[Running]:
    """A model that never stops, with room for a long answer: to be cut off."""
    with serving(tiny_models("qwen3moe", steer=2), ctx=16384) as running:
        yield running


@contextmanager
def spy(obj: Any, name: str) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record the calls of `obj.name` (still calling it)."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    real = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        delattr(obj, name)


# ---- models, health, plain chat


@pytest.mark.slow
def test_models_and_health(qwen3):
    models = qwen3.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    extra = models[0].model_extra or {}
    assert extra["qwenrun"]["n_ctx"] == 1024
    assert extra["qwenrun"]["thinking"] == "hybrid"
    with qwen3.http() as http:
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ready"
        assert http.get("/v1/models/tiny").json()["id"] == "tiny"
        assert http.get("/v1/models/other").status_code == 404


@pytest.mark.slow
def test_chat_completion_not_streamed(qwen3):
    reply = qwen3.client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=12,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert "<think>" not in choice.message.content
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 10
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    timings = (reply.model_extra or {})["timings"]
    assert timings["predicted_n"] == usage.completion_tokens
    # The request's log line is written once its answer has gone out: wait for it.
    assert wait_for(lambda: [ln for ln in qwen3.logs if "POST /v1/chat/completions 200" in ln])


def test_chat_completion_streamed(qwen3):
    stream = qwen3.client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []  # the usage chunk
    assert chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1
    assert "<think>" not in text


@pytest.mark.slow
def test_prefix_is_reused_across_requests(qwen3):
    first = qwen3.client.chat.completions.create(model="tiny", messages=USER, max_tokens=8)
    answer = first.choices[0].message.content or ""
    follow = [*USER, {"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
    second = qwen3.client.chat.completions.create(model="tiny", messages=follow, max_tokens=8)
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details
    assert cached is not None and cached.cached_tokens is not None
    # Everything up to the first prompt's end at least was not evaluated again.
    assert cached.cached_tokens >= first.usage.prompt_tokens - 1


@pytest.mark.slow
def test_sampling_defaults_follow_the_mode_and_requests_override_them(qwen3):
    presets = qwen3.served.profile.presets
    with spy(qwen3.served.engine, "generate") as calls:
        for thinking in (True, False):
            qwen3.client.chat.completions.create(
                model="tiny",
                messages=USER,
                max_tokens=2,
                extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
            )
        qwen3.client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=2, temperature=0.1, top_p=0.5, seed=7
        )
    used = [args[1] for args, _ in calls]
    assert used[0] == presets["think"]
    assert used[1] == presets["direct"]
    assert (used[2].temperature, used[2].top_p, used[2].seed) == (0.1, 0.5, 7)
    assert used[2].top_k == presets["think"].top_k  # the rest from the mode's preset


def test_stop_strings_cut_the_answer(qwen3):
    with prefilled(qwen3, "Hello there. STOP and more"):
        reply = qwen3.client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=40,
            stop=["STOP"],
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    assert reply.choices[0].message.content == "Hello there. "
    assert reply.choices[0].finish_reason == "stop"


# ---- thinking


@pytest.mark.slow
def test_thinking_per_request_goes_to_reasoning_never_to_content(qwen35):
    def ask(thinking: bool, **extra: Any) -> Any:
        return qwen35.client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=300,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}, **extra},
        )

    on = ask(True, thinking_budget=4).choices[0].message
    extra = on.model_extra or {}
    assert extra["reasoning_content"]
    assert extra["reasoning"] == extra["reasoning_content"]
    # The budget closed the thinking with Qwen's own wrap-up; the answer came after it.
    assert "Considering the limited time" in extra["reasoning_content"]
    assert on.content
    assert "<think>" not in on.content and "</think>" not in on.content
    assert "Considering" not in on.content

    off = ask(False).choices[0].message
    assert not (off.model_extra or {}).get("reasoning_content")
    assert off.content

    # Without a budget this never-stopping model thinks until max_tokens leaves no room.
    endless = ask(True).choices[0]
    assert (endless.message.model_extra or {})["reasoning_content"]


@pytest.mark.slow
def test_thinking_streams_as_reasoning_deltas(qwen35):
    stream = qwen35.client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=300,
        stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 4},
    )
    reasoning, content = [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            assert not content, "thinking after the answer began"
            reasoning.append(extra["reasoning_content"])
        if delta.content:
            content.append(delta.content)
    assert "Considering the limited time" in "".join(reasoning)
    assert content and "</think>" not in "".join(content)


# ---- tool calls


def template_call(running: Running) -> str:
    """A get_weather call as the model's own template writes an assistant's call."""
    history = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = running.served.template.render(history, enable_thinking=False, tools=[WEATHER])
    turn = prompt.index("<|im_start|>assistant")  # the system prompt has an example call
    start = prompt.index("<tool_call>", turn)
    end = prompt.index("</tool_call>", start) + len("</tool_call>")
    return prompt[start:end]


@pytest.fixture(scope="module", params=["qwen3moe", "qwen35moe"], ids=["json", "xml"])
def caller(request, tiny_models) -> Iterator[Running]:
    """A model that ends every answer at once (eos_bias): after a forced call, nothing."""
    # Room for Qwen3.5's long tool instructions in a vocabulary of single bytes.
    with serving(tiny_models(request.param, steer=1, eos_bias=10.0), ctx=4096) as running:
        yield running


@pytest.mark.slow
def test_the_forced_call_is_in_the_templates_format(caller):
    call = template_call(caller)
    if caller.served.tool_format == "xml":
        assert "<function=get_weather>" in call and "<parameter=city>" in call
    else:
        assert '"name": "get_weather"' in call


@pytest.mark.slow
def test_tool_call_round_trip(caller):
    client = caller.client
    with prefilled(caller, template_call(caller)):
        reply = client.chat.completions.create(
            model="tiny",
            messages=USER,
            tools=[WEATHER],
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    # Typed by the request's schema: days is an integer even in the XML form.
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert calls[0].id.startswith("call_")

    # The client sends the call back with the tool's answer, as the openai SDK has it.
    history = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 24 C"},
    ]
    with spy(caller.served.template, "render") as rendered:
        again = client.chat.completions.create(
            model="tiny",
            messages=history,
            tools=[WEATHER],
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    assert again.choices[0].finish_reason == "stop"
    messages = rendered[0][0][0]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    prompt = caller.served.template.render(messages, enable_thinking=False, tools=[WEATHER])
    assert "sunny, 24 C" in prompt
    assert template_call(caller).split("\n")[1] in prompt  # the call, in the model's format


@pytest.mark.slow
def test_tool_call_streamed(caller):
    with prefilled(caller, "Checking.\n\n" + template_call(caller)):
        stream = caller.client.chat.completions.create(
            model="tiny",
            messages=USER,
            tools=[WEATHER],
            stream=True,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        chunks = [c for c in stream if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Checking."
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_tool_call_after_thinking(caller):
    """Thinking on, budget 0: the thinking closes at once and the call follows `</think>`."""
    with prefilled(caller, template_call(caller)):
        reply = caller.client.chat.completions.create(
            model="tiny",
            messages=USER,
            tools=[WEATHER],
            extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 0},
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.slow
def test_named_tool_choice_forces_the_call_opening(caller):
    # The model (which ends every answer at once) cannot finish the forced call: what it
    # wrote comes back as text, not as a call and not as an error.
    reply = caller.client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    content = choice.message.content or ""
    assert content.startswith("<tool_call>")
    expected = "<function=get_weather>" if caller.served.tool_format == "xml" else "get_weather"
    assert expected in content


def test_tool_choice_none_renders_no_tools(caller):
    with spy(caller.served.template, "render") as rendered:
        caller.client.chat.completions.create(
            model="tiny", messages=USER, tools=[WEATHER], tool_choice="none"
        )
    assert rendered[0][1]["tools"] is None


def test_a_tool_call_written_inside_thinking_is_decided_by_what_follows():
    """Qwen3.5 sometimes opens `<tool_call>` before `</think>`: a draft if `</think>` follows
    (issue 20), the answer's if the text ends there (tests/test_answer_router.py has the rest)."""
    opened: list[str] = []
    router = AnswerRouter(opened=True, divert_tool_calls=True, on_answer=lambda: opened.append("x"))
    pieces = ["Let me check the", " weather.\n<tool", "_call>\n<function=f>\n", "</function>"]
    pieces += ["\n</tool_call>"]
    events = [e for p in pieces for e in router.feed(p)] + router.flush()
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    assert thinking == "Let me check the weather."
    assert answer.startswith("\n<tool_call>\n<function=f>") and answer.endswith("</tool_call>")
    assert opened == []  # no call opening is forced into a call the model already writes
    # Followed by `</think>`, the same call was a draft: thinking, and no call.
    router = AnswerRouter(opened=True, divert_tool_calls=True)
    events = [e for p in [*pieces, "\n</think>\n\nDone."] for e in router.feed(p)]
    events += router.flush()
    assert "<tool_call>" in "".join(e.text for e in events if isinstance(e, Thinking))
    assert "".join(e.text for e in events if isinstance(e, Answer)) == "Done."
    # Without tools, the same text is thinking.
    plain = AnswerRouter(opened=True, divert_tool_calls=False)
    events = [e for p in pieces for e in plain.feed(p)] + plain.flush()
    assert "<tool_call>" in "".join(e.text for e in events if isinstance(e, Thinking))


def test_stop_matcher_holds_back_a_partial_stop():
    stop = StopMatcher(("END",))
    assert stop.feed("abc E") == "abc "
    assert stop.feed("N") == ""
    assert stop.feed("x") == "ENx"
    assert stop.feed(" then EN") == " then "
    assert stop.feed("D more") == ""
    assert stop.matched and stop.flush() == ""


# ---- raw completions


@pytest.mark.slow
def test_raw_completion(qwen3):
    reply = qwen3.client.completions.create(model="tiny", prompt="Once upon a", max_tokens=6)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    echoed = qwen3.client.completions.create(
        model="tiny", prompt="Once upon a", max_tokens=3, echo=True
    )
    assert echoed.choices[0].text.startswith("Once upon a")
    stream = qwen3.client.completions.create(
        model="tiny", prompt="Once upon a", max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---- errors, over raw HTTP


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                    },
                ]
            },
            "messages[1].tool_calls",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_parameter(qwen3, body, param):
    with qwen3.http() as http:
        err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


@pytest.mark.slow
def test_malformed_json_and_template_refusals_are_400(qwen3, qwen35):
    with qwen3.http() as http:
        error_of(
            http.post(
                "/v1/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            400,
        )
    # Qwen3.5's template refuses a conversation without a user message.
    with qwen35.http() as http:
        only_system = {"messages": [{"role": "system", "content": "only this"}]}
        err = error_of(http.post("/v1/chat/completions", json=only_system), 400)
    assert "No user query found" in err["message"]


def test_context_overflow_is_400_with_the_numbers(qwen3):
    long = [{"role": "user", "content": "word " * 2000}]
    with qwen3.http() as http:
        err = error_of(http.post("/v1/chat/completions", json={"messages": long}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "1024" in err["message"]
    assert any(ch.isdigit() for ch in err["message"].replace("1024", ""))


def test_unknown_endpoint_and_method(qwen3):
    with qwen3.http() as http:
        assert error_of(http.get("/v1/nothing"), 404)["type"] == "not_found_error"
        error_of(http.get("/v1/chat/completions"), 405)


def test_an_internal_failure_is_500_without_a_traceback(qwen3):
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    qwen3.served.engine.generate = broken  # type: ignore[method-assign]
    try:
        with qwen3.http() as http:
            err = error_of(http.post("/v1/chat/completions", json={"messages": USER}), 500)
    finally:
        del qwen3.served.engine.generate
    assert "secret" not in err["message"]
    assert wait_for(
        lambda: [ln for ln in qwen3.logs if "secret internals" in ln and "Traceback" in ln]
    )


@pytest.mark.slow
def test_api_key(tiny_models):
    with serving(tiny_models("qwen3moe", steer=1), api_key="s3cret") as running:
        with running.http() as http:
            assert http.get("/health").status_code == 200  # for load balancers: no key
            err = error_of(http.get("/v1/models"), 401)
            assert err["type"] == "authentication_error"
            wrong = {"Authorization": "Bearer s3cres"}
            error_of(http.get("/v1/models", headers=wrong), 401)
            right = {"Authorization": "Bearer s3cret"}
            assert http.get("/v1/models", headers=right).status_code == 200
        keyed = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


@pytest.mark.slow
def test_oversized_body_is_413(tiny_models):
    with serving(tiny_models("qwen3moe", steer=1), max_body=4096) as running:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        with running.http() as http:
            error_of(http.post("/v1/chat/completions", json=big), 413)

            # A chunked body declares no length: it is counted as it arrives.
            def chunks() -> Iterator[bytes]:
                yield json.dumps(big).encode()

            error_of(http.post("/v1/chat/completions", content=chunks()), 413)


@pytest.mark.slow
def test_loading_server_answers_503(tiny_models):
    state = ServerState("tiny", Worker(2))
    with Server(state, bind("127.0.0.1", 0)) as server, httpx.Client(base_url=server.url) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        resp = http.post("/v1/chat/completions", json={"messages": USER})
        assert error_of(resp, 503)["code"] == "model_loading"
        assert resp.headers["Retry-After"]


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(tiny_models):
    with serving(tiny_models("qwen3moe", steer=2), ctx=16384, max_waiting=0) as running:
        body = {"messages": USER, "max_tokens": 15000, "stream": True}
        with running.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200  # --queue 0: one generates, none waits
            lines = r.iter_lines()
            next(lines)  # the first event: the model is generating for this client
            with running.http() as other:
                resp = other.post("/v1/chat/completions", json={"messages": USER})
            assert error_of(resp, 503)["code"] == "server_busy"
            assert int(resp.headers["Retry-After"]) >= 1


# ---- clients that leave, clients that share


@pytest.mark.slow
def test_a_client_that_disconnects_cancels_its_generation(endless):
    body = {"messages": USER, "max_tokens": 15000, "stream": True}
    with endless.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The generation stops at its next token; the request's log line says how it ended.
    done = wait_for(lambda: [ln for ln in endless.logs if "cancelled" in ln])
    tokens = int(done[0].split("→ ")[1].split(" tokens")[0])
    assert tokens < 15000
    # The engine is free again: a new request is answered.
    reply = endless.client.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
    assert reply.choices[0].finish_reason == "length"


def wait_for(found: Callable[[], list[str]], timeout: float = TIMEOUT) -> list[str]:
    """Until `found` finds something: the log line of a request that ended after its client
    left is written by the server's thread, when the engine has stopped."""
    done = threading.Event()
    result: list[str] = []
    deadline = timeout
    step = 0.05
    while deadline > 0:
        result = found()
        if result:
            return result
        done.wait(step)
        deadline -= step
    raise AssertionError("timed out")


@pytest.mark.slow
def test_two_concurrent_clients_are_served_one_after_the_other(qwen3):
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            stream = qwen3.client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"client {i}"}],
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            results[i] = chunks
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    for chunks in results.values():
        assert chunks[-1].usage is not None
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


# ---- run and chat through the server (the --server client)


class _Plain(render.PlainRenderer):
    pass


@pytest.mark.slow
def test_remote_turns_are_the_same_events_as_local_ones(qwen35):
    import io

    remote = remote_client.RemoteModel.connect(qwen35.url)
    assert remote.n_ctx == 2048 and remote.id == "tiny"
    conv = remote.conversation(mode="think", budget=4, settings={"max_tokens": 300})
    events = list(chat.stream_turn(remote, conv, "hello"))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ThinkingText" and kinds[-1] == "TurnDone"
    assert "ThinkingDone" in kinds and "AnswerText" in kinds
    assert kinds.index("ThinkingDone") < kinds.index("AnswerText")
    result = events[-1].result  # type: ignore[union-attr]
    assert result.stats is not None and result.stats.generated_tokens <= 300
    assert result.thinking_tokens > 0
    assert len(conv.turns) == 1 and conv.turns[0].answer == result.answer

    # A second turn resends the conversation; the server's cache spares the first one.
    out, err = io.StringIO(), io.StringIO()
    second = chat.run_turn(remote, conv, _Plain(out=out, err=err, show_stats=True), "more")
    assert second.stats is not None and second.stats.eval_prompt_tokens < second.stats.prompt_tokens
    assert out.getvalue().strip() == second.answer.strip()
    assert "decode" in err.getvalue()
    assert remote.tokenize("hello") and remote.cache_report() is not None


def test_remote_names_the_model_it_serves(qwen3):
    remote = remote_client.RemoteModel.connect(qwen3.url)
    remote.check_model(None)
    remote.check_model("tiny")
    with pytest.raises(Exception, match="runs tiny, not qwen3-30b-a3b"):
        remote.check_model("qwen3-30b-a3b")


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.mark.slow
def test_the_repl_runs_unchanged_on_a_server(qwen3):
    import io
    from typing import cast

    from qwenrun.ui import repl
    from qwenrun.ui.prompt import ChatPrompt

    remote = remote_client.RemoteModel.connect(qwen3.url)
    conv = remote.conversation(settings={"seed": 1, "max_tokens": 8})
    said: list[str] = []
    out = io.StringIO()
    script = "/nothink\nhello\n/think\nsecond\n/stats\n/exit\n"
    prompt = ChatPrompt(repl.COMMANDS, None, interactive=False, stdin=io.StringIO(script))
    loop = repl.Repl(
        cast(Engine, remote),
        conv,
        render.PlainRenderer(out=out, err=io.StringIO()),
        prompt,
        say=said.append,
    )
    assert loop.run() == 0
    assert [t.mode for t in conv.turns] == ["direct", "think"]
    stats = "\n".join(said)
    assert "of 1,024 tokens" in stats and "2 turns" in stats


# ---- text that is not valid Unicode, bodies nested too deeply (issue 19)


@pytest.mark.slow
def test_text_that_is_not_unicode_becomes_the_replacement_character_and_is_logged(qwen3):
    # JSON's "\ud800" escape decodes to a lone surrogate, which the tokenizer cannot encode;
    # raw bytes that are not UTF-8 are the same case. The rule (qwenrun.text): each becomes
    # U+FFFD, and the request's log line says how many.
    chat_body = rb'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}'
    text_body = b'{"prompt": "caf\xe9 \\udfff", "max_tokens": 2}'
    headers = {"content-type": "application/json"}
    before = len(qwen3.logs)
    with qwen3.http() as http:
        reply = http.post("/v1/chat/completions", content=chat_body, headers=headers)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
        completion = http.post("/v1/completions", content=text_body, headers=headers)
        assert completion.status_code == 200, completion.text
        # The prompt the engine saw is the cleaned text: U+FFFD where each bad one was.
        usage = completion.json()["usage"]["prompt_tokens"]
        tokens = http.post("/tokenize", content=rb'{"content": "caf\udcff \ud800"}').json()
        cleaned = http.post("/tokenize", json={"content": "caf\ufffd \ufffd"}).json()
    assert tokens["tokens"] == cleaned["tokens"]
    assert usage == len(cleaned["tokens"])

    def posted() -> list[str]:  # a log line is written once its answer has gone out
        found = [ln for ln in qwen3.logs[before:] if " POST " in ln]
        return found if len(found) == 4 else []

    lines = wait_for(posted)
    chat_line = next(ln for ln in lines if "/v1/chat/completions 200" in ln)
    text_line = next(ln for ln in lines if "/v1/completions 200" in ln)
    tokenized = [ln for ln in lines if "/tokenize 200" in ln]
    assert "1 byte of the request was not UTF-8 (each is now \ufffd)" in chat_line
    assert "2 bytes of the request were not UTF-8" in text_line
    assert sorted("not UTF-8" in ln for ln in tokenized) == [False, True]
    assert not any("Traceback" in ln for ln in qwen3.logs[before:])


@pytest.mark.slow
def test_the_engine_tokenizes_text_that_slipped_through_as_the_rule_says(qwen3):
    # The last guard: whatever reaches the tokenizer with a lone surrogate is read by the
    # same rule (U+FFFD), instead of `encode` raising inside the engine's thread.
    engine = qwen3.served.engine
    assert engine.tokenize("caf\udce9 \ud800") == engine.tokenize("caf\ufffd \ufffd")


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # deeper than Python's JSON decoder can recurse
        # Decodable, but deeper than any real request (here a tool's schema): refused before
        # the template's and the tool-call code's own recursion could fail on it.
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        b'"function": {"name": "f", "parameters": {"type": "object", "properties": {"a": '
        + b'{"a": ' * 600
        + b"{}"
        + b"}" * 600
        + b"}}}}]}",
        b'{"messages": [{"role": "user", "content": "x"}], "seed": 1' + b"0" * 5000 + b"}",
    ],
    ids=["decoder-depth", "request-depth", "huge-number"],
)
def test_bodies_nested_too_deeply_or_with_huge_numbers_are_400(qwen3, body):
    before = len(qwen3.logs)
    with qwen3.http() as http:
        resp = http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        err = error_of(resp, 400)
    assert "nests" in err["message"] or "not valid JSON" in err["message"]
    # The log line is written once the answer has gone out.
    wait_for(lambda: [ln for ln in qwen3.logs[before:] if "POST /v1/chat/completions 400" in ln])
    assert not any("Traceback" in ln for ln in qwen3.logs[before:])


@pytest.mark.slow
def test_a_bug_in_a_handler_is_a_500_logged_once_with_its_status(capsys):
    # A state the card cannot be read from stands in for any bug in a handler's own code
    # (one on the engine's thread is `test_an_internal_failure_is_500_without_a_traceback`).
    logs: list[str] = []
    state = ServerState("tiny", Worker(2, log=logs.append), log=logs.append)
    state.status, state.model = "ready", cast(ServedModel, object())
    with Server(state, bind("127.0.0.1", 0)) as server, httpx.Client(base_url=server.url) as http:
        err = error_of(http.get("/v1/models"), 500)
        wait_for(lambda: [ln for ln in logs if "GET /v1/models 500" in ln])
        state.model = None  # no engine to close
    assert err["message"] == "internal error: see the server's log"
    assert sum("Traceback" in ln for ln in logs) == 1
    assert "Traceback" not in capsys.readouterr().err  # not a second time, by uvicorn


# ---- a server that stops mid-answer (issue 19)


@contextmanager
def stoppable(path: Path) -> Iterator[tuple[Server, list[str]]]:
    """A server the test stops itself, as Ctrl-C or SIGTERM stop `qwenrun serve`."""
    engine = Engine.load(path, LoadConfig(n_ctx=16384, n_threads=1, prompt_cache=0))
    logs: list[str] = []
    state = ServerState("tiny", Worker(8, log=logs.append), log=logs.append)
    state.ready(ServedModel.from_engine(engine, "tiny"))
    server = Server(state, bind("127.0.0.1", 0))
    server.start()
    try:
        yield server, logs
    finally:
        server.stop()


def busy(server: Server) -> bool:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        return bool(http.get("/v1/models").json()["data"][0]["qwenrun"]["busy"])


@pytest.mark.slow
def test_a_stopping_server_ends_a_stream_with_an_error_the_openai_client_raises(tiny_models):
    with stoppable(tiny_models("qwen3moe", steer=2)) as (server, logs):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        got: dict[str, Any] = {"chunks": 0}

        def read() -> None:  # read as it comes, as a client does, until the stream ends
            stream = client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=15000, stream=True
            )
            try:
                for chunk in stream:
                    got["chunks"] += 1
                    got["finish"] = chunk.choices[0].finish_reason if chunk.choices else None
            except openai.APIError as exc:
                got["error"] = exc

        def wait() -> None:  # queued behind it when the server stops: refused, same code
            body = {"prompt": "hi", "max_tokens": 100, "stream": True}
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
                got["waiting"] = http.post("/v1/completions", json=body)

        reader, waiter = threading.Thread(target=read), threading.Thread(target=wait)
        reader.start()
        wait_for(lambda: ["generating"] if got["chunks"] > 1 else [])
        waiter.start()
        wait_for(lambda: ["waiting"] if server.state.worker.waiting else [])
        server.stop()
        reader.join(TIMEOUT)
        waiter.join(TIMEOUT)
    error = got["error"]
    assert isinstance(error, openai.APIError) and got["finish"] is None
    assert error.body["code"] == "server_stopping"  # type: ignore[index]
    assert "before the answer was complete" in error.message
    assert error_of(got["waiting"], 503)["code"] == "server_stopping"
    cut = [ln for ln in logs if "POST /v1/chat/completions 200" in ln]
    assert len(cut) == 1 and "cut off: the server is stopping" in cut[0]
    assert any("POST /v1/completions 503" in ln for ln in logs)


@pytest.mark.slow
def test_a_stopping_server_cuts_a_text_stream_without_done(tiny_models):
    with stoppable(tiny_models("qwen3moe", steer=2)) as (server, logs):
        body = {"prompt": "hi", "max_tokens": 15000, "stream": True}
        with (
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
            http.stream("POST", "/v1/completions", json=body) as resp,
        ):
            events = resp.iter_lines()
            assert next(e for e in events if e).startswith("data: {")
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            rest = [e for e in events if e]
        stopper.join(TIMEOUT)  # the server has stopped: every request has its log line
    assert "data: [DONE]" not in rest
    last = json.loads(rest[-1].removeprefix("data: "))
    assert last["error"]["code"] == "server_stopping"
    chunks = [json.loads(e.removeprefix("data: ")) for e in rest[:-1]]
    assert not any(c["finish_reason"] for chunk in chunks for c in chunk["choices"])
    assert any("POST /v1/completions 200" in ln and "cut off" in ln for ln in logs)


@pytest.mark.slow
def test_a_stopping_server_answers_a_whole_request_in_flight_with_503(tiny_models):
    with stoppable(tiny_models("qwen3moe", steer=2)) as (server, logs):
        result: dict[str, httpx.Response] = {}
        body = {"messages": USER, "max_tokens": 15000}

        def ask() -> None:
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
                result["r"] = http.post("/v1/chat/completions", json=body)

        asking = threading.Thread(target=ask)
        asking.start()
        wait_for(lambda: ["busy"] if busy(server) else [])
        server.stop()
        asking.join(TIMEOUT)
    err = error_of(result["r"], 503)
    assert err["code"] == "server_stopping" and "before the answer was complete" in err["message"]
    line = next(ln for ln in logs if "POST /v1/chat/completions" in ln)
    assert " 503 " in line and "→" in line and "cut off: the server is stopping" in line


@pytest.mark.slow
def test_a_stopping_server_refuses_a_waiting_tokenize_instead_of_counting_nothing(tiny_models):
    with stoppable(tiny_models("qwen3moe", steer=2)) as (server, _logs):
        result: dict[str, httpx.Response] = {}

        def generate() -> None:
            body = {"messages": USER, "max_tokens": 15000}
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
                result["chat"] = http.post("/v1/chat/completions", json=body)

        def count() -> None:  # queued behind the answer when the server stops
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
                result["tokens"] = http.post("/tokenize", json={"content": "hello"})

        asking, counting = threading.Thread(target=generate), threading.Thread(target=count)
        asking.start()
        wait_for(lambda: ["busy"] if busy(server) else [])
        counting.start()
        wait_for(lambda: ["waiting"] if server.state.worker.waiting else [])
        server.stop()
        asking.join(TIMEOUT)
        counting.join(TIMEOUT)
    assert error_of(result["tokens"], 503)["code"] == "server_stopping"


@pytest.mark.slow
def test_a_model_argument_matches_the_file_a_server_chose():
    # A server started without MODEL serves as `default`, one started with a reference
    # without a quant as that reference; `run MODEL --server` still names it by what it
    # loaded: the hub repo of its cache folder and the quant in the file's name.
    path = "/hf/hub/models--unsloth--Qwen3-30B-A3B-GGUF/snapshots/0/Qwen3-30B-A3B-UD-Q4_K_XL.gguf"
    same = remote_client._same_model
    assert same("qwen3-30b-a3b", "default", path)
    assert same("qwen3-30b-a3b:UD-Q4_K_XL", "default", path)
    assert same("qwen3-30b-a3b:UD-Q4_K_XL", "qwen3-30b-a3b", path)
    assert not same("qwen3-30b-a3b:Q8_0", "qwen3-30b-a3b", path)
    assert not same("qwen3.5-35b-a3b", "default", path)
