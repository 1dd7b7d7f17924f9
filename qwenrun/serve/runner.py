"""One request's generation, run on the engine's thread: an OpenAI request in, output events out.

Contract: `run_chat(model, request, cancel, emit)` renders the request's messages (and tools)
through the model's own chat template with `enable_thinking` as asked, tokenizes it (reusing
the exact ids of the previous request's prompt and answer when the new prompt starts with
them), generates through `chat.Reply` (the same thinking splitter, budget and clock as a
terminal turn) and hands `emit` plain events: `Accepted` once the prompt fits, then
`ThinkingText`, `ThinkingDone`, `AnswerText` (chat's events) and `ToolCallOut` as the model
writes, and `Finished` with the finish reason, usage and timings. `run_completion` does the
same for a raw prompt. Request problems raise `RequestError` or a `QwenrunError` before
`Accepted`; nothing here knows HTTP. The engine is used from one thread at a time (the
caller's worker).

Qwen specifics handled here:

- thinking mode per request: the template's `enable_thinking`; a thinking-only model asked
  not to think gets a zero budget (it answers at once), a direct-only one simply answers;
- tool calls: parsed from the answer by `toolcalls.ToolCallParser` with the request's tool
  schemas; a call is emitted once complete, so a malformed one is only ever text;
  Qwen3.5 sometimes opens `<tool_call>` before closing `<think>`: with tools in play, that
  ends the thinking there and the call is parsed as part of the answer;
- `tool_choice` required or a named function: the call's opening is forced into the
  generation where the answer begins (after `</think>`), in the model's own format;
- `stop` strings apply to the answer (not to the thinking), and end the generation.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qwenrun import errors
from qwenrun.chat import AnswerText, Conversation, Reply, ThinkingDone, ThinkingText, TokenReuse
from qwenrun.engine.llama import GenStats, SamplingParams
from qwenrun.serve import protocol
from qwenrun.serve.protocol import ChatRequest, CompletionRequest, RequestError
from qwenrun.serve.toolcalls import CallDone, ToolCallParser
from qwenrun.serve.toolcalls import Content as CallText
from qwenrun.thinking import (
    CLOSE_TAG,
    Answer,
    Thinking,
    ThinkingBudget,
    ThinkSplitter,
    prompt_opens_thinking,
)

if TYPE_CHECKING:
    from qwenrun.engine.llama import Engine
    from qwenrun.template import ChatTemplate, Mode, ModelProfile

TOOL_OPEN = "<tool_call>"
ASSISTANT_MARKER = "<|im_start|>assistant"


# --------------------------------------------------------------------------------------
# The model being served


@dataclass
class ServedModel:
    """The loaded model, its template and presets, and the token ids its cache holds."""

    id: str
    engine: Engine
    template: ChatTemplate
    profile: ModelProfile
    path: str
    reasons: tuple[str, ...] = ()
    created: int = field(default_factory=protocol.now)
    cache: TokenReuse = field(default_factory=TokenReuse)
    # A test seam: text forced where the answer begins, instead of sampling it (tests make a
    # random-weight model write a given tool call through the real engine and parser).
    answer_prefill: Callable[[ChatRequest], str | None] | None = None

    @classmethod
    def from_engine(
        cls, engine: Engine, model_id: str | None = None, reasons: tuple[str, ...] = ()
    ) -> ServedModel:
        # The template and presets a terminal chat with this engine would have.
        conv = Conversation.for_engine(engine)
        path = engine.meta.path
        return cls(
            id=model_id or Path(path).stem,
            engine=engine,
            template=conv.template,
            profile=conv.profile,
            path=path,
            reasons=reasons,
        )

    @property
    def tool_format(self) -> Literal["json", "xml"]:
        """How the template teaches tool calls: Qwen3.5/3.6 and Coder XML, Qwen3 JSON."""
        return "xml" if "<function=" in self.template.source else "json"

    def info(self) -> dict[str, Any]:
        """What `/v1/models` says about the model beyond OpenAI's fields."""
        engine = self.engine
        return {
            "name": self.profile.name,
            "path": self.path,
            "arch": engine.meta.arch,
            "n_ctx": engine.n_ctx,
            "n_ctx_train": engine.meta.n_ctx_train,
            "thinking": self.profile.thinking,
            "presets": {
                mode: {
                    "temperature": p.temperature,
                    "top_p": p.top_p,
                    "top_k": p.top_k,
                    "min_p": p.min_p,
                    "presence_penalty": p.presence_penalty,
                }
                for mode, p in self.profile.presets.items()
            },
            "placement": engine.placement.to_dict(),
            "placement_text": engine.config.placement.describe(),
            "reasons": list(self.reasons),
            "tool_format": self.tool_format,
            "cache": _plain(dataclasses.asdict(engine.cache_report())),
            "chat_template": self.template.source,
        }


def _plain(value: Any) -> Any:
    """A value as JSON can carry it (paths as strings)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def run_tokenize(model: ServedModel, text: str) -> list[int]:
    return model.engine.tokenize(text)


# --------------------------------------------------------------------------------------
# What a request's generation emits


@dataclass(frozen=True)
class Accepted:
    """The prompt fits: the response may begin."""

    prompt_tokens: int


@dataclass(frozen=True)
class ToolCallOut:
    index: int  # among the calls sent (0, 1, …)
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop, length, tool_calls; cancelled when the client went away
    usage: dict[str, Any]
    timings: dict[str, Any]
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallOut, ...] = ()


# The thinking and answer events are chat's own (`chat.ThinkingText`, `ThinkingDone`,
# `AnswerText`): a server's reply is a terminal turn's reply.
Output = Accepted | ThinkingText | ThinkingDone | AnswerText | ToolCallOut | Finished
Emit = Callable[[Output], None]


# --------------------------------------------------------------------------------------
# Pieces of a chat completion


class StopMatcher:
    """Cuts text at the first of the `stop` strings; holds back what may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """The text that is safe to pass on; after a match, nothing more."""
        if self.matched:
            return ""
        if not self.stops:
            return text
        text = self._held + text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            self._held = ""
            return text[:cut]
        keep = max(_partial_suffix(text, s) for s in self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched else held


class AnswerRouter:
    """The server's thinking splitter (`chat.Splitter`): `ThinkSplitter`, plus two things a
    terminal chat does not need.

    With `divert_tool_calls`, a `<tool_call>` written inside thinking (Qwen3.5 does this)
    ends the thinking: the text from the tag on goes to the answer, where the tool-call
    parser reads it, and a later `</think>` is dropped. `on_answer` is called once, when the
    model closes its thinking with `</think>`: the moment to force the start of the answer.
    """

    def __init__(
        self,
        *,
        opened: bool,
        divert_tool_calls: bool,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self._inner = ThinkSplitter(in_thinking=opened)
        self._divert = divert_tool_calls
        self._diverted = False
        self._held = ""  # thinking text that may be the start of `<tool_call>`
        self._on_answer = on_answer

    @property
    def in_thinking(self) -> bool:
        return self._inner.in_thinking and not self._diverted

    def feed(self, piece: str) -> list[Answer | Thinking]:
        was_thinking = self.in_thinking
        events = self._inner.feed(piece)
        if self._divert:  # (else there is nothing to route: the per-token path stays short)
            events = self._route(events)
        closed = was_thinking and not self._inner.in_thinking and not self._diverted
        if closed and self._on_answer is not None:
            self._on_answer()
            self._on_answer = None
        return events

    def flush(self) -> list[Answer | Thinking]:
        events = self._route(self._inner.flush())
        held, self._held = self._held, ""
        if held:
            events.append(Answer(held) if self._diverted else Thinking(held))
        return events

    def _route(self, events: list[Answer | Thinking]) -> list[Answer | Thinking]:
        out: list[Answer | Thinking] = []
        for ev in events:
            if self._diverted:
                out.append(Answer(ev.text))
                continue
            if isinstance(ev, Answer):
                if self._held:  # a partial tag that the end of thinking proved was none
                    out.append(Thinking(self._held))
                    self._held = ""
                out.append(ev)
                continue
            text = self._held + ev.text
            at = text.find(TOOL_OPEN) if self._divert else -1
            if at >= 0:
                before = text[:at].rstrip()
                if before:
                    out.append(Thinking(before))
                self._diverted, self._held = True, ""
                out.append(Answer(text[at:]))
                continue
            keep = _partial_suffix(text, TOOL_OPEN) if self._divert else 0
            body = text[: len(text) - keep]
            if self._divert:
                body = body.rstrip()  # whitespace before a `<tool_call>` is no one's text
            self._held = text[len(body) :]
            if body:
                out.append(Thinking(body))
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def resolve_mode(profile: ModelProfile, enable_thinking: bool | None) -> tuple[Mode, int | None]:
    """The mode to render and a budget it imposes: a thinking-only model asked not to think
    closes its thinking at once (budget 0), the nearest it has to a direct mode."""
    if enable_thinking is None:
        return profile.default_mode, None
    if profile.thinking == "hybrid":
        return ("think" if enable_thinking else "direct"), None
    if profile.thinking == "thinking":
        return "think", (None if enable_thinking else 0)
    return "direct", None


def forced_call_opening(request: ChatRequest, fmt: Literal["json", "xml"]) -> str | None:
    """The start of a tool call that `tool_choice` requires, in the template's format."""
    choice = request.tool_choice
    if choice == "required":
        return TOOL_OPEN + "\n"
    if isinstance(choice, tuple):
        name = choice[1]
        if fmt == "xml":
            return f"{TOOL_OPEN}\n<function={name}>\n"
        return f'{TOOL_OPEN}\n{{"name": "{name}", "arguments": '
    return None


def _sampling(profile: ModelProfile, mode: Mode, given: dict[str, Any]) -> SamplingParams:
    return replace(profile.presets[mode], **given)


def _check_fits(engine: Engine, n_prompt: int, what: str) -> None:
    if n_prompt >= engine.n_ctx:
        raise errors.ContextOverflowError(
            f"This model's maximum context length is {engine.n_ctx} tokens. However, your "
            f"{what} resulted in {n_prompt} tokens, and at least one token must be left "
            "for the answer.",
            hint="shorten the messages, or restart the server with a larger --ctx",
        )


def timings(stats: GenStats | None) -> dict[str, Any]:
    """llama-server's `timings` object, plus the engine's own numbers."""
    if stats is None:
        return {}
    prompt_ms = (
        stats.eval_prompt_tokens / stats.prefill_tok_s * 1000 if stats.prefill_tok_s else 0.0
    )
    return {
        "cache_n": stats.prompt_tokens - stats.eval_prompt_tokens,
        "prompt_n": stats.eval_prompt_tokens,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_second": round(stats.prefill_tok_s, 3),
        "predicted_n": stats.generated_tokens,
        "predicted_ms": round(stats.decode_wall_ms, 3),
        "predicted_per_second": round(stats.decode_tok_s, 3),
        "reused_n": stats.reused_tokens,
        "reused_from": stats.reused_from,
        "ttft_ms": round(stats.ttft_ms, 3),
        "llama_eval_ms": round(stats.llama_eval_ms, 3),
        "llama_sample_ms": round(stats.llama_sample_ms, 3),
    }


def _usage(stats: GenStats | None, n_prompt: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    if stats is None:
        return protocol.usage(n_prompt, 0, 0)
    return protocol.usage(
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.prompt_tokens - stats.eval_prompt_tokens,
        reasoning_tokens,
    )


# --------------------------------------------------------------------------------------
# The two kinds of request


def render_prompt(model: ServedModel, request: ChatRequest, mode: Mode) -> str:
    try:
        return model.template.render(
            request.messages,
            enable_thinking=mode == "think",
            tools=request.tools if request.use_tools else None,
            extra=request.template_vars,
        )
    except errors.InvalidModelError as exc:
        # The messages are what the template refused (no user message, a bad order): the
        # client's to fix, so a 400 rather than the model's error.
        raise RequestError(
            exc.message.replace("the model's chat template failed", "the chat template refused")
            + " (check the order and roles of the messages)",
            "messages",
        ) from None


def run_chat(model: ServedModel, request: ChatRequest, cancel: threading.Event, emit: Emit) -> None:
    engine = model.engine
    mode, imposed_budget = resolve_mode(model.profile, request.enable_thinking)
    prompt = render_prompt(model, request, mode)
    tokens = model.cache.tokens_for(engine, prompt)
    _check_fits(engine, len(tokens), "messages")
    room = engine.n_ctx - len(tokens)
    # A max_tokens beyond the room left is cut to it (the answer ends with "length"), as
    # llama-server does, rather than refused.
    max_tokens = min(request.max_tokens or room, room)
    budget_limit = imposed_budget if imposed_budget is not None else request.budget
    emit(Accepted(len(tokens)))

    model.cache.forget()  # until this generation is known to have ended cleanly
    gen = engine.generate(
        tokens, _sampling(model.profile, mode, request.sampling), max_tokens, cancel
    )
    budget = ThinkingBudget(budget_limit, max_tokens)
    opened = prompt_opens_thinking(prompt, ASSISTANT_MARKER)
    tail = prompt[prompt.rfind(ASSISTANT_MARKER) :]
    # Where the answer begins: now (direct mode, or the template closed the thinking), or
    # after the `</think>` the model writes.
    answer_now = not opened and (CLOSE_TAG in tail or mode == "direct")
    opening = model.answer_prefill(request) if model.answer_prefill else None
    if opening is None and request.use_tools:
        opening = forced_call_opening(request, model.tool_format)

    def force_answer() -> None:
        assert opening is not None
        # After `</think>` Qwen writes a blank line; a budget's forced close already has it.
        gen.force_text(("" if budget.fired else "\n\n") + opening)

    router = AnswerRouter(
        opened=opened,
        divert_tool_calls=request.use_tools,
        on_answer=force_answer if opening is not None and not answer_now else None,
    )
    if opening is not None:
        if answer_now:
            gen.force_text(opening)
        elif not opened:
            gen.force_text("<think>\n")  # Qwen3 in thinking mode always opens it itself

    reply = Reply(gen, opened=opened, budget=budget, splitter=router)
    stop = StopMatcher(request.stop)
    parser = ToolCallParser(request.tools) if request.use_tools else None
    content: list[str] = []
    calls: list[ToolCallOut] = []

    def answer(text: str, final: bool = False) -> None:
        if parser is None and not request.stop:  # the common case, once per token: short
            if text:
                content.append(text)
                emit(AnswerText(text))
            return
        text = stop.feed(text) + (stop.flush() if final else "")
        if stop.matched and not cancel.is_set():
            cancel.set()  # the generation ends at its next token
        if parser is None:
            if text:
                content.append(text)
                emit(AnswerText(text))
            return
        events = parser.feed(text) if text else []
        if final:
            events += parser.finish()
        for ev in events:
            if isinstance(ev, CallText):
                content.append(ev.text)
                emit(AnswerText(ev.text))
            elif isinstance(ev, CallDone):
                # A call goes out whole, once `</tool_call>` closed it: one that turns out
                # malformed is then only ever text (CallStarted/CallAborted stay in here).
                out = ToolCallOut(len(calls), ev.call.id, ev.call.name, ev.call.arguments_json)
                calls.append(out)
                emit(out)

    for ev in reply.events():
        if isinstance(ev, AnswerText):
            answer(ev.text)  # through the tool-call parser and the stop strings
        else:
            emit(ev)  # thinking goes out as the reply gave it
    answer("", final=True)

    if stop.matched:
        reason = "stop"
    elif gen.finish_reason == "length":
        reason = "length"
    elif gen.finish_reason == "cancelled":
        reason = "cancelled"
    else:
        reason = "tool_calls" if calls else "stop"
    if gen.finish_reason in ("stop", "length") or stop.matched:
        model.cache.remember(engine, prompt, tokens, gen.tokens, reply.raw, gen.finish_reason)
    emit(
        Finished(
            reason,
            _usage(gen.stats, len(tokens), reply.thinking_tokens),
            timings(gen.stats) | {"thinking_ms": round(reply.thinking_seconds * 1000, 3)},
            content="".join(content),
            reasoning=reply.thinking,
            tool_calls=tuple(calls),
        )
    )


def run_completion(
    model: ServedModel, request: CompletionRequest, cancel: threading.Event, emit: Emit
) -> None:
    engine = model.engine
    if isinstance(request.prompt, str):
        prompt_text = request.prompt
        tokens = model.cache.tokens_for(engine, prompt_text)
    else:
        if any(not 0 <= t < engine.meta.n_vocab for t in request.prompt):
            raise RequestError("prompt holds token ids outside the vocabulary", "prompt")
        tokens = list(request.prompt)
        prompt_text = engine.detokenize(tokens)
    _check_fits(engine, len(tokens), "prompt")
    max_tokens = min(request.max_tokens, engine.n_ctx - len(tokens))
    emit(Accepted(len(tokens)))

    model.cache.forget()
    profile = model.profile
    gen = engine.generate(
        tokens, _sampling(profile, profile.default_mode, request.sampling), max_tokens, cancel
    )
    stop = StopMatcher(request.stop)
    text: list[str] = []
    raw: list[str] = []
    if request.echo:
        text.append(prompt_text)
        emit(AnswerText(prompt_text))
    for piece in gen:
        raw.append(piece)
        out = stop.feed(piece)
        if out:
            text.append(out)
            emit(AnswerText(out))
        if stop.matched and not cancel.is_set():
            cancel.set()
    tail = stop.flush()
    if tail:
        text.append(tail)
        emit(AnswerText(tail))
    reason = "stop" if stop.matched else gen.finish_reason or "stop"
    if isinstance(request.prompt, str) and gen.finish_reason in ("stop", "length"):
        model.cache.remember(
            engine, prompt_text, tokens, gen.tokens, "".join(raw), gen.finish_reason
        )
    emit(Finished(reason, _usage(gen.stats, len(tokens)), timings(gen.stats), "".join(text)))
