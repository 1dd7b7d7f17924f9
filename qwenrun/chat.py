"""A conversation with a loaded model, and one turn of it as a stream of events.

Contract: `Conversation` holds the system prompt and the turns, renders them with the GGUF's own
chat template (`template.ChatTemplate`, `enable_thinking` set per turn, and the
`reasoning_effort` asked for when the template has one: `set_effort`), picks the sampling preset
for the turn's mode, and saves and loads JSON transcripts; thinking text is kept for the
transcript but never sent back to the model (Qwen's guidance). Turns and the transcript file
format are `transcript.py`'s (a save is all or nothing and a load that fails changes nothing);
the settings' names and ranges are the sampling table's (`sampling.py`).
`stream_turn(engine, conv, text)` runs one turn and yields what happens as plain events
(notices, thinking text, the end of thinking, answer text, the finished `TurnResult`), the shape
of mlx-lm's `stream_generate`; `run_turn` hands those events to a `Renderer`. The REPL and
one-shot `qwenrun run` drive turns this way, on a loaded engine or on a `TurnServer` (a model
behind `qwenrun serve`, which yields the same events); the server generates through `Reply`, the
same thinking split, budget and clock as a turn here.

It does not load models or choose placements (launch/offload do), print anything (renderers
in `ui/` do), or touch llama.cpp (the engine does). The only state it keeps besides the
conversation is the token ids of the last prompt and answer, so the next prompt can reuse
them verbatim and the engine evaluates only what is new.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qwenrun import errors, sampling
from qwenrun import text as text_rule
from qwenrun.engine.values import GenStats, SamplingParams
from qwenrun.template import (
    ChatTemplate,
    Mode,
    ModelProfile,
    check_effort,
    fallback_template,
    match_catalog,
    model_profile,
    reasoning_efforts,
)
from qwenrun.thinking import Answer, Thinking, ThinkingBudget, ThinkSplitter, prompt_opens_thinking
from qwenrun.transcript import (
    TRANSCRIPT_FORMAT,
    Turn,
    read_transcript,
    write_file_atomically,
)

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.engine.llama import Engine, Generation

# --------------------------------------------------------------------------------------
# The conversation


@dataclass(frozen=True)
class Prepared:
    prompt: str
    tokens: list[int]
    dropped: int


class TokenReuse:
    """The text the engine last saw and the exact token ids it was (prompt plus answer).

    Re-tokenizing the model's own answer can give other ids than it sampled (BPE has
    several spellings of a text), which would make the engine evaluate it again; a prompt
    that starts with the remembered text reuses the remembered ids. Anything else is
    tokenized whole, and the engine's own prefix match still spares what it can. A chat
    `Conversation` and a served model each hold one.
    """

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[int] = []

    def tokens_for(self, engine: Engine, prompt: str) -> list[int]:
        """The prompt's tokens, the remembered ids standing for the text they spell."""
        if self.text and prompt.startswith(self.text):
            return self.tokens + engine.tokenize(prompt[len(self.text) :])
        return engine.tokenize(prompt)

    def remember(
        self,
        engine: Engine,
        prompt: str,
        prompt_tokens: list[int],
        tokens: list[int],
        text: str,
        reason: str | None,
    ) -> None:
        """Let the next prompt reuse these exact ids, if they spell exactly this text.

        The end-of-generation token is not part of the answer text (the template writes its
        own `<|im_end|>`); a control token inside the answer would not be in the text at all,
        and then reuse is skipped (the engine's prefix match still applies).
        """
        ids = list(tokens)
        if reason == "stop" and ids and engine.is_eog(ids[-1]):
            ids.pop()
        # A token with no bytes of its own is a control token the text does not show.
        if all(engine.token_bytes(t) for t in ids) and engine.detokenize(ids) == text:
            self.text, self.tokens = prompt + text, prompt_tokens + ids
        else:
            self.forget()

    def forget(self) -> None:
        self.text, self.tokens = "", []


class Conversation:
    """System prompt, turns, mode, reasoning effort, thinking budget and sampling settings of
    one chat."""

    def __init__(
        self,
        template: ChatTemplate,
        profile: ModelProfile,
        *,
        system: str | None = None,
        mode: Mode | None = None,
        budget: int | None = None,
        settings: Mapping[str, Any] | None = None,
        effort: str | None = None,
    ) -> None:
        self.template = template
        self.profile = profile
        self.system = system or None
        self.turns: list[Turn] = []
        self.mode: Mode = profile.default_mode
        if mode is not None:
            self.set_mode(mode)
        self.effort: str | None = None  # None: the template's own default
        self.set_effort(effort)
        self.budget: int | None = None
        self.set_budget(budget)
        self.settings: dict[str, Any] = {}
        self.max_tokens: int | None = None
        for key, value in (settings or {}).items():
            self.set(key, value)
        self.reuse = TokenReuse()

    @classmethod
    def for_engine(
        cls,
        engine: Engine,
        *,
        spec: ModelSpec | None = None,
        notice: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> Conversation:
        """A conversation with the engine's own template and the catalog's presets."""
        meta = engine.meta
        source = meta.chat_template
        if not source:
            source = fallback_template()
            if notice:
                notice("The model has no chat template; using Qwen3's.")
        template = ChatTemplate(source, bos_token=meta.bos_token, eos_token=meta.eos_token)
        if spec is None:
            spec = match_catalog(meta.metadata)
        name = meta.metadata.get("general.name") or Path(meta.path).stem
        return cls(template, model_profile(template, name, spec), **kwargs)

    # ---- settings

    def set_mode(self, mode: Mode) -> None:
        if not self.profile.supports(mode):
            if self.profile.thinking == "direct":
                raise errors.UsageError(
                    f"{self.profile.name} has no thinking mode: it answers directly",
                    hint="pick a thinking or hybrid Qwen model to think",
                )
            raise errors.UsageError(
                f"{self.profile.name} always thinks: it has no direct mode",
                hint="/budget 0 (or --budget 0) makes it answer at once",
            )
        self.mode = mode

    def set_effort(self, effort: str | None) -> None:
        """The template's `reasoning_effort` from the next prompt on (None: its default);
        a `UsageError` for a value the template refuses, or a model without the setting."""
        self.effort = (
            None if effort is None else check_effort(self.template, effort, self.profile.name)
        )

    @property
    def efforts(self) -> tuple[str, ...]:
        """The reasoning efforts this model's template takes (none: no such setting)."""
        return reasoning_efforts(self.template)

    def set_budget(self, budget: int | None) -> None:
        if budget is not None:
            budget = int(sampling.BY_KEY["budget"].check(budget))
        self.budget = budget

    def budget_note(self) -> str | None:
        """Why the thinking budget does nothing here, when it does not: said alike by
        `/budget` and by `run`/`chat --budget`."""
        if self.budget is None or self.profile.thinking != "direct":
            return None
        return f"{self.profile.name} never thinks: a thinking budget has no effect on it"

    def set(self, key: str, value: Any) -> None:
        """One `/set` (or command-line) setting by any of its names (`top-p`, `top_p`), its
        value text or a number: checked by the sampling table (`sampling.read`)."""
        setting, typed = sampling.read(key, value)
        if setting.sampler:
            self.settings[setting.field] = typed
        else:  # the turn's own limit (max_tokens): an attribute of the conversation
            setattr(self, setting.field, int(typed))

    def sampling(self, mode: Mode | None = None) -> SamplingParams:
        """The preset for the mode, with the user's settings on top."""
        base = self.profile.presets[mode or self.mode]
        return replace(base, **self.settings)

    @property
    def enable_thinking(self) -> bool:
        return self.mode == "think"

    # ---- the prompt

    def messages(self, pending: str | None = None) -> list[dict[str, str]]:
        """Chat messages for the template: answers only, never the thinking."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        for turn in self.turns:
            out.append({"role": "user", "content": turn.user})
            out.append({"role": "assistant", "content": turn.answer})
        if pending is not None:
            out.append({"role": "user", "content": pending})
        return out

    def render(self, pending: str) -> str:
        extra = {"reasoning_effort": self.effort} if self.effort else None
        return self.template.render(
            self.messages(pending), enable_thinking=self.enable_thinking, extra=extra
        )

    def tokens_for(self, engine: Engine, prompt: str) -> list[int]:
        """The prompt's tokens; the last prompt and answer reused as the very same ids."""
        return self.reuse.tokens_for(engine, prompt)

    def prepare(self, engine: Engine, pending: str) -> Prepared:
        """Render the next prompt, dropping the oldest turns while it leaves too little room.

        Room wanted for the answer: `max_tokens`, at most a quarter of the context. The
        system prompt is never dropped; a single message that does not fit is an error.
        """
        n_ctx = engine.n_ctx
        want = min(self.max_tokens or n_ctx, n_ctx // 4)
        kept = list(self.turns)
        dropped = 0
        while True:
            prompt = self.render(pending)
            tokens = self.tokens_for(engine, prompt)
            room = n_ctx - len(tokens)
            if room >= want or (room > 0 and not self.turns):
                return Prepared(prompt, tokens, dropped)
            if not self.turns:
                # A message that cannot fit even alone must not cost the conversation.
                self.turns = kept
                with_system = " with the system prompt" if self.system else ""
                raise errors.ContextOverflowError(
                    f"the message is {len(tokens)} tokens{with_system}, "
                    f"but the context holds {n_ctx}",
                    hint="shorten it, or raise --ctx",
                )
            self.turns.pop(0)
            dropped += 1

    def forget_tokens(self) -> None:
        self.reuse.forget()

    def add_turn(self, turn: Turn) -> None:
        self.turns.append(turn)

    def clear(self) -> None:
        self.turns.clear()
        self.forget_tokens()

    def context_tokens(self, engine: Engine) -> int:
        """Tokens the next prompt holds before the user's message: the system prompt, the
        kept turns (answers without their thinking) and the template's frame around them.

        This is what the conversation takes of the context, whatever the engine's cache still
        holds from earlier prompts (it keeps them until the next prompt reuses or drops them).
        """
        return len(self.tokens_for(engine, self.render("")))

    # ---- transcripts

    def to_json(self) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            reply: dict[str, Any] = {"role": "assistant", "content": turn.answer, "mode": turn.mode}
            if turn.thinking:
                reply["thinking"] = turn.thinking
            if turn.cut:
                reply["cut"] = True
            messages.append(reply)
        settings = dict(self.settings)
        if self.max_tokens is not None:
            settings["max_tokens"] = self.max_tokens
        return {
            "format": TRANSCRIPT_FORMAT,
            "model": self.profile.name,
            "saved": datetime.now().isoformat(timespec="seconds"),
            "system": self.system,
            "mode": self.mode,
            "budget": self.budget,
            "effort": self.effort,
            "settings": settings,
            "messages": messages,
        }

    def save(self, path: Path) -> None:
        """Write the transcript to `path`: all of it or nothing (a temporary file renamed
        over it), into a folder that exists (none is created)."""
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        write_file_atomically(path, text)

    def load(self, path: Path) -> list[str]:
        """Replace this conversation with a saved one; returns notes on what did not apply.

        The whole file is checked before anything changes: a transcript that is not valid
        leaves the conversation as it was, and the error names the message and field.
        """
        loaded = read_transcript(path)
        notes: list[str] = []
        if loaded.replaced:  # cleaned as it was read (`text.clean`): said once
            notes.append(text_rule.notice(loaded.replaced, "the transcript"))
        if loaded.mode is not None and loaded.mode != self.mode:
            if self.profile.supports(loaded.mode):
                self.mode = loaded.mode
            else:
                notes.append(f"kept {self.mode} mode: this model has no {loaded.mode} mode")
        effort = self.effort
        if loaded.effort is not None:
            try:  # checked before anything changes: the template decides what it takes
                effort = check_effort(self.template, loaded.effort, self.profile.name)
            except errors.UsageError as err:
                notes.append(f"kept the reasoning effort: {err.message}")
        self.system = loaded.system
        self.turns = loaded.turns
        self.forget_tokens()
        self.effort = effort
        self.budget = loaded.budget
        self.settings, self.max_tokens = loaded.settings, loaded.max_tokens
        return notes


# --------------------------------------------------------------------------------------
# One turn, as events


@dataclass(frozen=True)
class TurnResult:
    """What a finished turn shows: the parts, why it ended, and the engine's numbers."""

    answer: str
    thinking: str
    finish_reason: str
    stats: GenStats | None
    mode: str
    thinking_seconds: float = 0.0
    thinking_tokens: int = 0
    dropped_turns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cut(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass(frozen=True)
class Notice:
    """Something the user should know about this turn (e.g. old turns dropped)."""

    text: str


@dataclass(frozen=True)
class ThinkingText:
    text: str


@dataclass(frozen=True)
class ThinkingDone:
    """Thinking ended: how long it took and how many tokens it used."""

    seconds: float
    tokens: int


@dataclass(frozen=True)
class AnswerText:
    text: str


@dataclass(frozen=True)
class TurnDone:
    """The last event of a turn: the whole answer, why it ended, the engine's numbers."""

    result: TurnResult


TurnEvent = Notice | ThinkingText | ThinkingDone | AnswerText | TurnDone


@contextmanager
def sigint_sets(event: threading.Event) -> Iterator[threading.Event]:
    """While inside, Ctrl-C sets `event` (the engine stops at the next token) instead of
    raising KeyboardInterrupt. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def _handler(_signum: int, _frame: Any) -> None:
        event.set()

    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


class _ThinkingClock:
    """When thinking started and how many tokens it took, for the folded summary line."""

    def __init__(self) -> None:
        self.active = False
        self.started = False
        self.t0 = 0.0
        self.n0 = 0
        self.seconds = 0.0
        self.tokens = 0

    def start(self, n_generated: int) -> None:
        self.active, self.started = True, True
        self.t0, self.n0 = time.monotonic(), n_generated

    def stop(self, n_generated: int) -> None:
        self.active = False
        self.seconds = time.monotonic() - self.t0
        self.tokens = max(0, n_generated - self.n0)

    def spent(self, n_generated: int) -> int:
        return n_generated - self.n0


class Splitter(Protocol):
    """What tells thinking from answer in the model's text (`thinking.ThinkSplitter`; the
    server's wraps it to route tool calls)."""

    @property
    def in_thinking(self) -> bool: ...
    def feed(self, piece: str) -> list[Answer | Thinking]: ...
    def flush(self) -> list[Answer | Thinking]: ...


@runtime_checkable
class TurnServer(Protocol):
    """A model behind a server (`serve.client.RemoteModel`): it runs a whole turn of `conv`
    itself and yields the same events `stream_turn` does. The REPL's /stats also asks it
    what it asks an engine (`n_ctx`, `tokenize`, `cache_report`)."""

    @property
    def n_ctx(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    def stream_turn(
        self, conv: Conversation, text: str, *, cancel: threading.Event | None = None
    ) -> Iterator[TurnEvent]: ...


class Reply:
    """One generation as thinking and answer events: the heart of a turn, and of a server's
    chat completion.

    `events()` runs the generation once; `opened` says the prompt already opened `<think>`;
    the budget is kept by forcing its text into the generation. Afterwards `answer`,
    `thinking`, `raw` (all the text the model wrote, tags included), `thinking_seconds` and
    `thinking_tokens` hold the whole reply.
    """

    def __init__(
        self,
        gen: Generation,
        *,
        opened: bool,
        budget: ThinkingBudget,
        splitter: Splitter | None = None,
    ) -> None:
        self.gen = gen
        self.opened = opened
        self.budget = budget
        self.splitter: Splitter = splitter or ThinkSplitter(in_thinking=opened)
        self._clock = _ThinkingClock()
        self._thinking: list[str] = []
        self._answer: list[str] = []
        self._raw: list[str] = []
        self._costs: dict[str, int] = {}

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    @property
    def thinking(self) -> str:
        return "".join(self._thinking)

    @property
    def raw(self) -> str:
        return "".join(self._raw)

    @property
    def thinking_seconds(self) -> float:
        return self._clock.seconds

    @property
    def thinking_tokens(self) -> int:
        return self._clock.tokens

    def _cost(self, text: str) -> int:
        """Tokens that forcing `text` takes: they count against max_tokens like any other."""
        if text not in self._costs:
            self._costs[text] = self.gen.forced_length(text)
        return self._costs[text]

    def events(self) -> Iterator[ThinkingText | ThinkingDone | AnswerText]:
        gen, splitter, clock, budget = self.gen, self.splitter, self._clock, self.budget
        if self.opened:
            clock.start(0)
            forced = budget.step(True, 0, generated=0, cost=self._cost)
            if forced:
                gen.force_text(forced)
        for piece in gen:
            self._raw.append(piece)
            events = splitter.feed(piece)
            if splitter.in_thinking and not clock.started:
                clock.start(gen.n_generated)
            yield from self._dispatch(events)
            if clock.active and not splitter.in_thinking:
                yield from self._end_thinking()
            if clock.active:
                n = gen.n_generated
                forced = budget.step(True, clock.spent(n), generated=n, cost=self._cost)
                if forced:
                    gen.force_text(forced)
        yield from self._dispatch(splitter.flush())
        if clock.active:
            yield from self._end_thinking()

    def _end_thinking(self) -> Iterator[ThinkingDone]:
        self._clock.stop(self.gen.n_generated)
        if self.thinking.strip():
            yield ThinkingDone(self._clock.seconds, self._clock.tokens)

    def _dispatch(
        self, events: Iterable[Answer | Thinking]
    ) -> Iterator[ThinkingText | ThinkingDone | AnswerText]:
        for ev in events:
            if isinstance(ev, Answer):
                if self._clock.active:
                    yield from self._end_thinking()  # fold the thinking before the answer shows
                self._answer.append(ev.text)
                yield AnswerText(ev.text)
            else:
                self._thinking.append(ev.text)
                yield ThinkingText(ev.text)


def stream_turn(
    engine: Engine | TurnServer,
    conv: Conversation,
    text: str,
    *,
    cancel: threading.Event | None = None,
) -> Iterator[TurnEvent]:
    """Send one user message; yield the reply as events; add the turn to `conv`.

    The last event is `TurnDone` with the answer, the thinking, why it ended ("stop",
    "length", "cancelled") and the engine's stats. A cancelled reply keeps what was streamed
    and is marked as cut; one cancelled before any token leaves no turn behind. A
    `TurnServer` (`run`/`chat --server`) runs the turn itself, with the same events.
    """
    if isinstance(engine, TurnServer):
        yield from engine.stream_turn(conv, text, cancel=cancel)
        return
    prepared = conv.prepare(engine, text)
    if prepared.dropped:
        yield Notice(
            f"Context full: dropped the oldest {_plural(prepared.dropped, 'turn')}"
            " of the conversation."
        )
    mode = conv.mode
    room = engine.n_ctx - len(prepared.tokens)
    max_tokens = min(conv.max_tokens or room, room)
    gen = engine.generate(prepared.tokens, conv.sampling(), max_tokens, cancel)

    # The cap in force (max-tokens, or the room left in the context) keeps a share for the
    # answer, so thinking that runs long still leaves a reply.
    reply = Reply(
        gen,
        opened=prompt_opens_thinking(prepared.prompt),
        budget=ThinkingBudget(conv.budget, max_tokens),
    )
    yield from reply.events()

    reason = gen.finish_reason or "stop"
    result = TurnResult(
        answer=reply.answer,
        thinking=reply.thinking,
        finish_reason=reason,
        stats=gen.stats,
        mode=mode,
        thinking_seconds=reply.thinking_seconds,
        thinking_tokens=reply.thinking_tokens,
        dropped_turns=prepared.dropped,
    )
    if reason == "cancelled" and not gen.tokens:
        # Stopped before the model said anything: no turn to keep (an empty assistant
        # message in the history would only confuse the next prompt).
        conv.forget_tokens()
    else:
        conv.add_turn(
            # The answer as streamed: an edited copy would not match the tokens kept for reuse.
            Turn(text, result.answer, result.thinking, mode, cut=reason == "cancelled")
        )
        conv.reuse.remember(engine, prepared.prompt, prepared.tokens, gen.tokens, reply.raw, reason)
    yield TurnDone(result)


class Renderer(Protocol):
    """What shows a turn (`ui/render.py` has the terminal, pipe and JSON ones)."""

    def notice(self, text: str) -> None: ...
    def thinking(self, text: str) -> None: ...
    def thinking_done(self, seconds: float, tokens: int) -> None: ...
    def answer(self, text: str) -> None: ...
    def turn_done(self, view: TurnResult) -> None: ...
    def abort(self) -> None: ...


def render(events: Iterable[TurnEvent], out: Renderer) -> TurnResult:
    """Show a turn's events on `out`; a turn that fails midway leaves `out` tidy."""
    result: TurnResult | None = None
    try:
        for ev in events:
            if isinstance(ev, AnswerText):
                out.answer(ev.text)
            elif isinstance(ev, ThinkingText):
                out.thinking(ev.text)
            elif isinstance(ev, ThinkingDone):
                out.thinking_done(ev.seconds, ev.tokens)
            elif isinstance(ev, Notice):
                out.notice(ev.text)
            else:
                result = ev.result
    except BaseException:
        out.abort()  # a decode error mid-answer: no live panel left under the next prompt
        raise
    assert result is not None, "a turn always ends with TurnDone"
    out.turn_done(result)
    return result


def run_turn(
    engine: Engine | TurnServer,
    conv: Conversation,
    out: Renderer,
    text: str,
    *,
    cancel: threading.Event | None = None,
) -> TurnResult:
    """One turn shown on `out` (see `stream_turn`)."""
    return render(stream_turn(engine, conv, text, cancel=cancel), out)


def one_shot(
    engine: Engine | TurnServer,
    conv: Conversation,
    text: str,
    out: Renderer,
) -> TurnResult:
    """`qwenrun run`: one turn, Ctrl-C stops the answer (what streamed stays printed) and
    then ends the program as an interrupt."""
    note = conv.budget_note()
    if note:
        out.notice(note)
    cancel = threading.Event()
    with sigint_sets(cancel):
        result = run_turn(engine, conv, out, text, cancel=cancel)
    if result.cut:
        raise KeyboardInterrupt
    return result


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
