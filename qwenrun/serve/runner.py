"""One request's generation, run on the engine's thread: an OpenAI request in, output events out.

Contract: `run_chat(model, request, cancel, emit)` renders the request's messages (and tools)
through the model's own chat template with `enable_thinking` as asked, tokenizes it (reusing the
exact ids of the previous request's prompt and answer when the new prompt starts with them),
generates through `chat.Reply` (the same thinking splitter, budget and clock as a terminal turn)
and hands `emit` plain events: `Accepted` once the prompt fits, then `ThinkingText`,
`ThinkingDone`, `AnswerText` (chat's events) and `ToolCallDelta` as the model writes, and
`Finished` with the finish reason, usage, timings and the whole calls. `run_completion` does the
same for a raw prompt, `run_tokenize` answers `/tokenize`; the model they take is a
`ServedModel` (the engine, its template and presets, the token ids its cache holds, its API id
and card). Request problems raise `RequestError` or a `QwenrunError` before `Accepted`; nothing
here knows HTTP. The engine is used from one thread at a time (the caller's worker).

Qwen specifics handled here:

- thinking mode per request: the template's `enable_thinking`; a thinking-only model asked
  not to think gets a zero budget (it answers at once), a direct-only one simply answers;
- `reasoning_effort` per request (Qwen3.8-Flash-Next's xhigh, medium, low): passed to the
  template when it takes that value, a 400 naming the choices when not, or that the model
  has no such setting;
- tool calls: parsed from the answer by `toolcalls.ToolCallParser` with the request's tools
  and sent as `ToolCallDelta`s as the model writes them (id and name first, then argument
  pieces); `Finished.tool_calls` lists the calls that completed. A call the model did not
  finish (cut by max_tokens) is never listed and its streamed arguments never form JSON; its
  text comes as content. When the model's end-of-generation or a `stop` string ends the
  answer inside a call that is whole, it is still a call (finish reason `tool_calls`);
- a `<tool_call>` written inside thinking (Qwen3.5 does this) is routed by
  `answer_router.AnswerRouter`: a draft when `</think>` or more thinking follows it, the
  answer's when the text ends without `</think>`;
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

from qwenrun import errors, sampling
from qwenrun.chat import AnswerText, Conversation, Reply, ThinkingDone, ThinkingText, TokenReuse
from qwenrun.engine.values import GenStats, SamplingParams
from qwenrun.serve import protocol
from qwenrun.serve.answer_router import AnswerRouter
from qwenrun.serve.protocol import ChatRequest, CompletionRequest, RequestError
from qwenrun.serve.toolcalls import CallArguments, CallDone, CallStarted, ToolCall, ToolCallParser
from qwenrun.serve.toolcalls import Content as CallText
from qwenrun.serve.toolcalls_xml import OPEN_TAG as CALL_OPEN
from qwenrun.template import check_effort
from qwenrun.thinking import CLOSE_TAG, ThinkingBudget, partial_suffix, prompt_opens_thinking

if TYPE_CHECKING:
    from qwenrun.engine.llama import Engine
    from qwenrun.template import ChatTemplate, Mode, ModelProfile

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
                    s.field: getattr(p, s.field)
                    for s in sampling.SAMPLER_SETTINGS
                    if getattr(p, s.field) is not None  # a preset has no seed
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
class ToolCallDelta:
    """A piece of a tool call as the model writes it: the first piece of a call has its id and
    name (and maybe no arguments), the later ones only argument text. A call's pieces join to
    its JSON arguments, which are valid JSON only once its last piece came (a call the model
    did not finish never looks whole)."""

    index: int  # the call's index in the stream (0, 1, …)
    arguments: str
    id: str = ""
    name: str = ""


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop, length, tool_calls; cancelled when the client went away
    usage: dict[str, Any]
    timings: dict[str, Any]
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


# The thinking and answer events are chat's own (`chat.ThinkingText`, `ThinkingDone`,
# `AnswerText`): a server's reply is a terminal turn's reply.
Output = Accepted | ThinkingText | ThinkingDone | AnswerText | ToolCallDelta | Finished
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
        keep = max(partial_suffix(text, s) for s in self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched else held


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
        return CALL_OPEN + "\n"
    if isinstance(choice, tuple):
        name = choice[1]
        if fmt == "xml":
            return f"{CALL_OPEN}\n<function={name}>\n"
        return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": '
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


def _template_vars(model: ServedModel, request: ChatRequest) -> dict[str, Any]:
    """The request's template variables, with its reasoning effort once the template is
    known to take it (a 400 otherwise: never a template error halfway through)."""
    extra = dict(request.template_vars)
    if request.reasoning_effort is not None:
        try:
            effort = check_effort(model.template, request.reasoning_effort, model.profile.name)
        except errors.UsageError as exc:
            raise RequestError(f"{exc.message}; {exc.hint}", "reasoning_effort") from None
        extra["reasoning_effort"] = effort
    return extra


def render_prompt(model: ServedModel, request: ChatRequest, mode: Mode) -> str:
    extra = _template_vars(model, request)
    try:
        return model.template.render(
            request.messages,
            enable_thinking=mode == "think",
            tools=request.tools if request.use_tools else None,
            extra=extra,
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
    calls: list[ToolCall] = []

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
            # The model ended its text (end-of-generation, or a stop string cut it): a call
            # whose `</tool_call>` never came is still whole. Cut by max_tokens: never.
            events += parser.finish(model_ended=stop.matched or gen.finish_reason == "stop")
        for ev in events:
            if isinstance(ev, CallText):
                content.append(ev.text)
                emit(AnswerText(ev.text))
            elif isinstance(ev, CallStarted):
                emit(ToolCallDelta(ev.index, "", ev.id, ev.name))
            elif isinstance(ev, CallArguments):
                emit(ToolCallDelta(ev.index, ev.delta))
            elif isinstance(ev, CallDone):
                calls.append(ev.call)
            # (CallAborted: nothing to send. The call's arguments, as streamed, never close;
            # its text follows as content, and the whole response never lists it.)

    for ev in reply.events():
        if isinstance(ev, AnswerText):
            answer(ev.text)  # through the tool-call parser and the stop strings
        else:
            emit(ev)  # thinking goes out as the reply gave it
    answer("", final=True)

    if gen.finish_reason == "length" and not stop.matched:
        reason = "length"
    elif gen.finish_reason == "cancelled" and not stop.matched:
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
