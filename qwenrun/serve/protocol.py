"""OpenAI's wire format: requests read into plain values, responses and errors written back.

Contract: pure (no I/O, no engine). `parse_chat(body)`, `parse_completion(body)` and
`parse_tokenize(body)` turn a decoded JSON body into a `ChatRequest`, `CompletionRequest` or
`TokenizeRequest`, or raise `RequestError` (a 400, with the parameter at fault) for anything the
server cannot honour as asked: a bad type or range (sampling settings, token limit and thinking
budget are checked by the one sampling table, `sampling.SETTINGS`, as the command line and
`/set` check them), `n` other than 1, images, logprobs, a structured-output `response_format`.
Unknown fields are ignored, as OpenAI-compatible servers do. Messages come out in the form
Qwen's templates render: text content, assistant `tool_calls` with mapping arguments
(`toolcalls.history_tool_calls`), `reasoning_content` kept when a client sends it back. Every
request is read through `_object`, the one seam: each string in the body (values and keys, at
any depth) goes through `text.clean`, the project's rule for text that is not valid Unicode (a
lone surrogate, such as JSON's `"\\ud800"`, becomes U+FFFD), and the count comes back on the
request as `replaced` for its log line; a body nested deeper than `MAX_DEPTH` is refused.
`error_body` is OpenAI's error shape; the chunk and response builders are the shapes the
`openai` client reads, with `reasoning_content` and `reasoning` (the same text: vLLM and
some clients read one, llama.cpp and others the other) and llama-server's `timings`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qwenrun import errors, sampling, text
from qwenrun.serve.toolcalls import history_tool_calls

# Template variables a request may not set: the server sets them itself (reasoning_effort
# once checked against the template).
_RESERVED_TEMPLATE_VARS = frozenset(
    {
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "enable_thinking",
        "reasoning_effort",
    }
)
MAX_STOP = 4  # as OpenAI
# How deeply a request may nest objects and arrays. A real one nests a handful of levels (a
# tool's JSON schema a dozen or so). Near Python's recursion limit (1,000 frames), the JSON
# decoder, the template's `tojson` and the tool-call code would fail inside the server: the
# limit keeps well clear of that, and refuses such a body as a 400 instead.
MAX_DEPTH = 512


class RequestError(Exception):
    """A request the server cannot honour: a 400 naming the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


ToolChoice = Literal["auto", "none", "required"] | tuple[Literal["function"], str]


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields given
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool | None = None  # None: the model's default mode
    # `reasoning_effort` (top level, as OpenAI's; or in chat_template_kwargs): checked against
    # what the model's template takes when the request runs (`runner`); None: its default
    reasoning_effort: str | None = None
    budget: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = "auto"
    template_vars: dict[str, Any] = field(default_factory=dict)
    replaced: int = 0  # code points that were not valid Unicode, now U+FFFD (`text.clean`)

    @property
    def use_tools(self) -> bool:
        """Whether tools are rendered and calls parsed (`tool_choice: none` turns both off)."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 16  # OpenAI's default for completions
    stop: tuple[str, ...] = ()
    echo: bool = False
    replaced: int = 0


@dataclass(frozen=True)
class TokenizeRequest:
    """llama-server's `POST /tokenize`: `{"content": TEXT}`."""

    content: str
    replaced: int = 0


# --------------------------------------------------------------------------------------
# Requests


def parse_chat(body: Any) -> ChatRequest:
    doc, replaced = _object(body)
    messages = _messages(doc.get("messages"))
    tools = _tools(doc.get("tools"))
    tool_choice = _tool_choice(doc.get("tool_choice"), tools)
    kwargs = doc.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise RequestError(
            "chat_template_kwargs.enable_thinking must be true or false",
            "chat_template_kwargs.enable_thinking",
        )
    effort = doc.get("reasoning_effort", kwargs.get("reasoning_effort"))
    if effort is not None and not isinstance(effort, str):
        raise RequestError("reasoning_effort must be a string", "reasoning_effort")
    _unsupported(doc)
    return ChatRequest(
        messages=messages,
        model=_str(doc.get("model", ""), "model"),
        stream=_bool(doc.get("stream", False), "stream"),
        include_usage=_include_usage(doc),
        sampling=_sampling(doc),
        max_tokens=_limit(doc, "max-tokens"),
        stop=_stop(doc.get("stop")),
        enable_thinking=thinking,
        reasoning_effort=effort,
        budget=_limit(doc, "budget"),
        tools=tools,
        tool_choice=tool_choice,
        template_vars={
            str(k): v for k, v in kwargs.items() if str(k) not in _RESERVED_TEMPLATE_VARS
        },
        replaced=replaced,
    )


def parse_completion(body: Any) -> CompletionRequest:
    doc, replaced = _object(body)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError(
                "prompt must be a string or a list of token ids (one prompt per request)",
                "prompt",
            )
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string", "prompt")
    if doc.get("suffix"):
        raise RequestError("suffix (fill-in-the-middle) is not supported", "suffix")
    if doc.get("best_of") not in (None, 1):
        raise RequestError("best_of must be 1: one completion per request", "best_of")
    _unsupported(doc)
    max_tokens = _limit(doc, "max-tokens")
    return CompletionRequest(
        prompt=prompt,
        model=_str(doc.get("model", ""), "model"),
        stream=_bool(doc.get("stream", False), "stream"),
        include_usage=_include_usage(doc),
        sampling=_sampling(doc),
        max_tokens=16 if max_tokens is None else max_tokens,
        stop=_stop(doc.get("stop")),
        echo=_bool(doc.get("echo", False), "echo"),
        replaced=replaced,
    )


def parse_tokenize(body: Any) -> TokenizeRequest:
    doc, replaced = _object(body)
    content = doc.get("content")
    if not isinstance(content, str):
        raise RequestError("content must be a string", "content")
    return TokenizeRequest(content, replaced)


def _object(body: Any) -> tuple[dict[str, Any], int]:
    """The request body as read: a JSON object, its text cleaned (see the module docstring),
    and how many code points were replaced."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body, _clean_strings(body)


def _clean_strings(body: dict[str, Any]) -> int:
    """Pass every string of a decoded JSON body, keys included, through `text.clean`, in
    place (the body is the request's own, fresh from the decoder); return the count
    replaced. A loop with a stack, not recursion: the depth is what is being checked."""
    replaced = 0
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(
                f"the request body nests objects and arrays more than {MAX_DEPTH} levels deep"
            )
        if isinstance(node, dict):
            if not all(key.isascii() for key in node):
                pairs = list(node.items())
                node.clear()
                for key, value in pairs:
                    key, n = text.clean(key)
                    replaced += n
                    node[key] = value
            slots: list[tuple[Any, Any]] = list(node.items())
        else:
            slots = list(enumerate(node))
        for slot, value in slots:
            if isinstance(value, str):
                value, n = text.clean(value)
                if n:
                    replaced += n
                    node[slot] = value
            elif isinstance(value, dict | list):
                stack.append((value, depth + 1))
    return replaced


def _unsupported(doc: Mapping[str, Any]) -> None:
    """Refuse what would silently change the answer's meaning or shape if ignored."""
    if doc.get("n") not in (None, 1):
        raise RequestError("n must be 1: one choice per request", "n")
    if doc.get("logprobs") not in (None, False, 0) or doc.get("top_logprobs"):
        raise RequestError("logprobs are not supported", "logprobs")
    fmt = doc.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise RequestError(
            "response_format other than text is not supported (no constrained decoding)",
            "response_format",
        )
    if doc.get("frequency_penalty") not in (None, 0, 0.0):
        raise RequestError(
            "frequency_penalty is not supported; presence_penalty is (Qwen's presets use it)",
            "frequency_penalty",
        )


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty array", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise RequestError(f"{param} must be an object", param)
        role = msg.get("role")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(
                f"{param}.role must be system, user, assistant or tool, not {role!r}",
                f"{param}.role",
            )
        entry: dict[str, Any] = {"role": role, "content": _content(msg.get("content"), param)}
        if isinstance(msg.get("name"), str):
            entry["name"] = msg["name"]
        if role == "assistant":
            calls = msg.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise RequestError(f"{param}.tool_calls must be an array", param)
                try:
                    entry["tool_calls"] = history_tool_calls(calls)
                except ValueError as exc:
                    raise RequestError(f"{param}.{exc}", f"{param}.tool_calls") from None
            for key in ("reasoning_content", "reasoning"):
                if isinstance(msg.get(key), str) and msg[key]:
                    entry["reasoning_content"] = msg[key]
                    break
        elif role == "tool" and isinstance(msg.get("tool_call_id"), str):
            entry["tool_call_id"] = msg["tool_call_id"]
        out.append(entry)
    return out


def _content(value: Any, param: str) -> str:
    """A message's content as text. Qwen's templates need a string (Qwen3 fails on None)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
                continue
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image_url", "input_image", "image", "input_audio", "file"):
                raise RequestError(
                    f"{param} has {kind} content: this server runs text-only models",
                    f"{param}.content",
                )
            else:
                raise RequestError(f"{param}.content has a part of unknown type", param)
        return "".join(parts)
    raise RequestError(f"{param}.content must be a string or an array of parts", param)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError("tools must be an array", "tools")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(function, Mapping)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise RequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                f"tools[{i}]",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]"
            )
    return [dict(t) for t in value] or None


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    if value is None or value == "auto":
        return "auto"
    if value == "none":
        return "none"
    names = {t["function"]["name"] for t in tools or ()}
    if value == "required":
        if not names:
            raise RequestError("tool_choice required needs tools", "tool_choice")
        return "required"
    if isinstance(value, Mapping):
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str):
            if name not in names:
                raise RequestError(f"tool_choice names {name!r}, which is not in tools", "tools")
            return ("function", name)
    raise RequestError(
        "tool_choice must be auto, none, required or {'type': 'function', 'function': "
        "{'name': ...}}",
        "tool_choice",
    )


def _setting(doc: Mapping[str, Any], setting: sampling.Setting) -> int | float | None:
    """A setting of the sampling table from the first of its request fields that is given,
    checked by the table (the same type and range as `/set` and the command line)."""
    for key in setting.server:
        value = doc.get(key)
        if value is not None:
            try:
                return setting.check(value, key)
            except errors.UsageError as err:
                raise RequestError(err.message, key) from None
    return None


def _sampling(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler's settings the request gives, by `SamplingParams` field."""
    given = {s.field: _setting(doc, s) for s in sampling.SAMPLER_SETTINGS}
    return {field: value for field, value in given.items() if value is not None}


def _limit(doc: Mapping[str, Any], key: str) -> int | None:
    """A token limit of the table's (`max-tokens`, `budget`) as the request gives it."""
    value = _setting(doc, sampling.BY_KEY[key])
    return None if value is None else int(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) for s in stops)
    ):
        raise RequestError(f"stop must be a string or up to {MAX_STOP} strings", "stop")
    return tuple(s for s in stops if s)


def _include_usage(doc: Mapping[str, Any]) -> bool:
    options = doc.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise RequestError("stream_options must be an object", "stream_options")
    return bool(options.get("include_usage"))


def _bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{param} must be true or false", param)
    return value


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string", param)
    return value


# --------------------------------------------------------------------------------------
# Responses


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def now() -> int:
    return int(time.time())


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: Mapping[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
        ],
        **extra,
    }


def reasoning_delta(text: str) -> dict[str, Any]:
    return {"reasoning_content": text, "reasoning": text}


def tool_call_deltas(index: int, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
    """A whole call as OpenAI streams one: id and name first, then the arguments."""
    return [
        {
            "tool_calls": [
                {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]},
    ]


def chat_message(
    content: str, reasoning: str, tool_calls: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content with tool calls and nothing else to say.
        "content": content if content or not tool_calls else None,
        "refusal": None,
    }
    if reasoning:
        message.update(reasoning_delta(reasoning))
    if tool_calls:
        message["tool_calls"] = [dict(c) for c in tool_calls]
    return message


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
