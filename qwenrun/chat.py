"""Conversations with a loaded model: the template, one turn, the REPL, one-shot answers.

Contract: `Conversation` holds the system prompt and the turns, renders them with the GGUF's
own chat template (jinja2's sandbox, `enable_thinking` set per turn) and picks the sampling
preset for the turn's mode; thinking text is kept for the transcript but never sent back to
the model (Qwen's guidance). `run_turn` runs one turn on an `Engine` and streams it to a
`ui.Renderer`; both the REPL (`repl`) and one-shot `qwenrun run` (`one_shot`) use it.

It does not load models or choose placements (launch/offload do), print anything itself
(ui does), or touch llama.cpp (backend does). The only state it keeps besides the
conversation is the token ids of the last prompt and answer, so the next prompt can reuse
them verbatim and the engine evaluates only what is new.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenrun import config, errors, ui
from qwenrun.backend import GenStats, SamplingParams
from qwenrun.thinking import Answer, ThinkingBudget, ThinkSplitter, prompt_opens_thinking
from qwenrun.ui import SlashCommand, TurnResult

if TYPE_CHECKING:
    from qwenrun.backend import Engine
    from qwenrun.catalog import ModelSpec

Mode = Literal["think", "direct"]
ThinkingKind = Literal["hybrid", "thinking", "direct"]

# Qwen3's model card: thinking 0.6/0.95/20/0, non-thinking 0.7/0.8/20/0. Used for a GGUF the
# catalog does not know, and for a mode its catalog entry gives no preset for.
DEFAULT_PRESETS: dict[str, SamplingParams] = {
    "think": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),
    "direct": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),
}

# `/set` names → SamplingParams fields (max-tokens is the conversation's own).
SETTINGS: dict[str, tuple[str, type]] = {
    "temp": ("temperature", float),
    "top-p": ("top_p", float),
    "top-k": ("top_k", int),
    "min-p": ("min_p", float),
    "presence-penalty": ("presence_penalty", float),
    "seed": ("seed", int),
    "max-tokens": ("max_tokens", int),
}

# Field names (transcripts, keyword arguments) → the `/set` names.
_SETTING_ALIASES = {field: key for key, (field, _kind) in SETTINGS.items()} | {
    k.replace("-", "_"): k for k in SETTINGS
}

TRANSCRIPT_FORMAT = "qwenrun-transcript/1"


# --------------------------------------------------------------------------------------
# The chat template


class ChatTemplate:
    """A GGUF's `tokenizer.chat_template`, rendered as llama.cpp's Jinja formatter does.

    Same environment as llama-cpp-python's `Jinja2ChatFormatter`: sandboxed, trim/lstrip
    blocks, loop controls, a `tojson` that keeps non-ASCII text, `raise_exception` and
    `strftime_now`. A template error is the model's problem, reported as one.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols"],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise errors.InvalidModelError(
                f"the model's chat template does not parse: {exc}",
                hint="use a GGUF with a working tokenizer.chat_template",
            ) from None

    def render(self, messages: Sequence[Mapping[str, Any]], *, enable_thinking: bool) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                enable_thinking=enable_thinking,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise errors.InvalidModelError(
                f"the model's chat template failed: {exc}",
                hint="the template rejected this conversation; try /clear",
            ) from None


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def fallback_template() -> str:
    """Qwen3's own template, for a GGUF that carries none (all Qwen models speak ChatML)."""
    return (Path(__file__).parent / "testing" / "templates" / "qwen3.jinja").read_text("utf-8")


def detect_thinking_kind(template: ChatTemplate) -> ThinkingKind:
    """What the template supports, learnt by rendering it: the truth for this very file.

    `enable_thinking` changes the prompt → hybrid; the prompt always opens `<think>` →
    thinking-only; neither → direct-only.
    """
    probe = [{"role": "user", "content": "hi"}]
    on = template.render(probe, enable_thinking=True)
    off = template.render(probe, enable_thinking=False)
    if on != off:
        return "hybrid"
    return "thinking" if prompt_opens_thinking(on) else "direct"


# --------------------------------------------------------------------------------------
# What the model supports, and its sampling presets


@dataclass(frozen=True)
class ModelProfile:
    name: str
    thinking: ThinkingKind
    presets: Mapping[str, SamplingParams]

    @property
    def default_mode(self) -> Mode:
        return "direct" if self.thinking == "direct" else "think"

    def supports(self, mode: Mode) -> bool:
        return self.thinking == "hybrid" or (mode == "think") == (self.thinking == "thinking")

    def describe_modes(self) -> str:
        if self.thinking == "hybrid":
            return "thinks or answers directly (/think, /nothink)"
        if self.thinking == "thinking":
            return "always thinks (/budget N caps it)"
        return "answers directly (no thinking mode)"


def presets_from_spec(spec: ModelSpec | None) -> dict[str, SamplingParams]:
    presets = dict(DEFAULT_PRESETS)
    if spec is not None:
        for mode, p in spec.presets.items():
            presets[mode] = SamplingParams(
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                min_p=p.min_p,
                presence_penalty=p.presence_penalty,
            )
    return presets


def match_catalog(metadata: Mapping[str, str]) -> ModelSpec | None:
    """The catalog entry a local GGUF names in its metadata, if any."""
    try:
        from qwenrun import catalog
    except ImportError:  # the catalog is optional at this layer: Qwen3's defaults apply
        return None

    for key in ("general.basename", "general.name"):
        name = metadata.get(key)
        if not name:
            continue
        try:
            return catalog.lookup(name)
        except errors.ModelNotFoundError:
            continue  # a fine-tune or an unknown name: try the next key, then defaults
    return None


def model_profile(template: ChatTemplate, name: str, spec: ModelSpec | None = None) -> ModelProfile:
    display = spec.display if spec is not None else name
    return ModelProfile(display, detect_thinking_kind(template), presets_from_spec(spec))


# --------------------------------------------------------------------------------------
# The conversation


@dataclass
class Turn:
    user: str
    answer: str
    thinking: str = ""
    mode: Mode = "direct"
    cut: bool = False


@dataclass(frozen=True)
class Prepared:
    prompt: str
    tokens: list[int]
    dropped: int


@dataclass
class _Reuse:
    """The text the engine last saw and the exact tokens it was (prompt plus answer)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)


class Conversation:
    """System prompt, turns, mode, thinking budget and sampling settings of one chat."""

    def __init__(
        self,
        template: ChatTemplate,
        profile: ModelProfile,
        *,
        system: str | None = None,
        mode: Mode | None = None,
        budget: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.template = template
        self.profile = profile
        self.system = system or None
        self.turns: list[Turn] = []
        self.mode: Mode = profile.default_mode
        if mode is not None:
            self.set_mode(mode)
        self.budget: int | None = None
        self.set_budget(budget)
        self.settings: dict[str, Any] = {}
        self.max_tokens: int | None = None
        for key, value in (settings or {}).items():
            self.set(key, value)
        self._reuse = _Reuse()

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

    def set_budget(self, budget: int | None) -> None:
        if budget is not None and budget < 0:
            raise errors.UsageError("a thinking budget must be 0 or more tokens")
        self.budget = budget

    def set(self, key: str, value: Any) -> None:
        """One `/set` (or command-line) setting by its user-facing name, e.g. `top-p`."""
        key = _SETTING_ALIASES.get(key, key)
        if key not in SETTINGS:
            raise errors.UsageError(
                f"unknown setting {key!r}", hint=f"one of: {', '.join(SETTINGS)}"
            )
        name, kind = SETTINGS[key]
        try:
            typed = kind(value)
        except (TypeError, ValueError):
            raise errors.UsageError(
                f"{key} needs a {'whole number' if kind is int else 'number'}, not {value!r}"
            ) from None
        _check_range(key, typed)
        if name == "max_tokens":
            self.max_tokens = typed
        else:
            self.settings[name] = typed

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
        return self.template.render(self.messages(pending), enable_thinking=self.enable_thinking)

    def tokens_for(self, engine: Engine, prompt: str) -> list[int]:
        """The prompt's tokens; the last prompt and answer reused as the very same ids.

        Re-tokenizing the model's own answer can give other ids than it sampled (BPE has
        several spellings of a text), which would make the engine evaluate it again.
        """
        reuse = self._reuse
        if reuse.text and prompt.startswith(reuse.text):
            return reuse.tokens + engine.tokenize(prompt[len(reuse.text) :])
        return engine.tokenize(prompt)

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

    def remember(self, prompt: str, prompt_tokens: list[int], text: str, tokens: list[int]) -> None:
        """Keep what the engine now holds, for `tokens_for` to reuse next turn."""
        self._reuse = _Reuse(prompt + text, prompt_tokens + tokens)

    def forget_tokens(self) -> None:
        self._reuse = _Reuse()

    def add_turn(self, turn: Turn) -> None:
        self.turns.append(turn)

    def clear(self) -> None:
        self.turns.clear()
        self.forget_tokens()

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
            "settings": settings,
            "messages": messages,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", "utf-8")

    def load(self, path: Path) -> list[str]:
        """Replace this conversation with a saved one; returns notes on what did not apply."""
        try:
            doc = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise errors.UsageError(f"no such transcript: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise errors.UsageError(f"{path} is not a JSON transcript: {exc}") from None
        turns = _turns_from_json(doc, path)
        notes: list[str] = []
        self.system = doc.get("system") or None
        self.turns = turns
        self.forget_tokens()
        mode = doc.get("mode")
        if mode in ("think", "direct"):
            if self.profile.supports(mode):
                self.mode = mode
            else:
                notes.append(f"kept {self.mode} mode: this model has no {mode} mode")
        if isinstance(doc.get("budget"), int) or doc.get("budget") is None:
            self.set_budget(doc.get("budget"))
        self.settings, self.max_tokens = {}, None
        for key, value in (doc.get("settings") or {}).items():
            self.set(key, value)
        return notes


def _check_range(key: str, value: float) -> None:
    limits: dict[str, tuple[float, float]] = {
        "temp": (0.0, 5.0),
        "top-p": (0.0, 1.0),
        "top-k": (0, 1_000_000),
        "min-p": (0.0, 1.0),
        "presence-penalty": (-2.0, 2.0),
        "max-tokens": (1, 10_000_000),
        "seed": (0, 2**32 - 1),
    }
    lo, hi = limits[key]
    if not lo <= value <= hi:
        raise errors.UsageError(f"{key} must be between {lo:g} and {hi:g}, not {value:g}")


def _turns_from_json(doc: Any, path: Path) -> list[Turn]:
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise errors.UsageError(f"{path} is not a qwenrun transcript (no messages list)")
    msgs = [m for m in doc["messages"] if isinstance(m, dict) and m.get("role") != "system"]
    turns: list[Turn] = []
    for i in range(0, len(msgs) - 1, 2):
        user, reply = msgs[i], msgs[i + 1]
        if user.get("role") != "user" or reply.get("role") != "assistant":
            raise errors.UsageError(
                f"{path}: message {i + 1} should be a user message followed by an answer"
            )
        mode: Mode = "think" if reply.get("mode") == "think" else "direct"
        turns.append(
            Turn(
                user=str(user.get("content", "")),
                answer=str(reply.get("content", "")),
                thinking=str(reply.get("thinking", "")),
                mode=mode,
                cut=bool(reply.get("cut", False)),
            )
        )
    return turns


# --------------------------------------------------------------------------------------
# One turn


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


def run_turn(
    engine: Engine,
    conv: Conversation,
    out: ui.Renderer,
    text: str,
    *,
    cancel: threading.Event | None = None,
) -> TurnResult:
    """Send one user message, stream the reply to `out`, add the turn to `conv`.

    Returns the answer, the thinking, why it ended ("stop", "length", "cancelled") and the
    engine's stats. A cancelled reply keeps what was streamed and is marked as cut.
    """
    prepared = conv.prepare(engine, text)
    if prepared.dropped:
        out.notice(
            f"Context full: dropped the oldest {_plural(prepared.dropped, 'turn')}"
            " of the conversation."
        )
    mode = conv.mode
    room = engine.n_ctx - len(prepared.tokens)
    max_tokens = min(conv.max_tokens or room, room)
    gen = engine.generate(prepared.tokens, conv.sampling(), max_tokens, cancel)

    opened = prompt_opens_thinking(prepared.prompt)
    splitter = ThinkSplitter(in_thinking=opened)
    # The cap in force (max-tokens, or the room left in the context) keeps a share for the
    # answer, so thinking that runs long still leaves a reply.
    budget = ThinkingBudget(conv.budget, max_tokens)
    clock = _ThinkingClock()
    thinking: list[str] = []
    answer: list[str] = []
    raw: list[str] = []

    def end_thinking() -> None:
        clock.stop(gen.n_generated)
        if "".join(thinking).strip():
            out.thinking_done(clock.seconds, clock.tokens)

    if opened:
        clock.start(0)
        forced = budget.step(True, 0)
        if forced:
            gen.force_text(forced)
    try:
        for piece in gen:
            raw.append(piece)
            events = splitter.feed(piece)
            if splitter.in_thinking and not clock.started:
                clock.start(gen.n_generated)
            _dispatch(events, out, thinking, answer, clock, end_thinking)
            if clock.active and not splitter.in_thinking:
                end_thinking()
            if clock.active:
                forced = budget.step(True, clock.spent(gen.n_generated))
                if forced:
                    gen.force_text(forced)
    except BaseException:
        out.abort()  # a decode error mid-answer: no live panel left under the next prompt
        raise
    _dispatch(splitter.flush(), out, thinking, answer, clock, end_thinking)
    if clock.active:
        end_thinking()

    reason = gen.finish_reason or "stop"
    result = TurnResult(
        answer="".join(answer),
        thinking="".join(thinking),
        finish_reason=reason,
        stats=gen.stats,
        mode=mode,
        thinking_seconds=clock.seconds,
        thinking_tokens=clock.tokens,
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
        _remember(engine, conv, prepared, gen.tokens, "".join(raw), reason)
    out.turn_done(result)
    return result


def _dispatch(
    events: list[Any],
    out: ui.Renderer,
    thinking: list[str],
    answer: list[str],
    clock: _ThinkingClock,
    end_thinking: Callable[[], None],
) -> None:
    for ev in events:
        if isinstance(ev, Answer):
            if clock.active:
                end_thinking()  # fold the thinking before the answer shows
            answer.append(ev.text)
            out.answer(ev.text)
        else:
            thinking.append(ev.text)
            out.thinking(ev.text)


def _remember(
    engine: Engine,
    conv: Conversation,
    prepared: Prepared,
    tokens: list[int],
    text: str,
    reason: str,
) -> None:
    """Let the next turn reuse these exact ids, if they spell exactly this text.

    The end-of-generation token is not part of the answer text (the template writes its
    own `<|im_end|>`); a control token inside the answer would not be in the text at all,
    and then reuse is skipped (the engine's prefix match still applies).
    """
    ids = list(tokens)
    if reason == "stop" and ids and engine.is_eog(ids[-1]):
        ids.pop()
    # A token with no bytes of its own is a control token the text does not show.
    if all(engine.token_bytes(t) for t in ids) and engine.detokenize(ids) == text:
        conv.remember(prepared.prompt, prepared.tokens, text, ids)
    else:
        conv.forget_tokens()


def one_shot(
    engine: Engine,
    conv: Conversation,
    text: str,
    out: ui.Renderer,
) -> TurnResult:
    """`qwenrun run`: one turn, Ctrl-C stops the answer (what streamed stays printed) and
    then ends the program as an interrupt."""
    cancel = threading.Event()
    with sigint_sets(cancel):
        result = run_turn(engine, conv, out, text, cancel=cancel)
    if result.cut:
        raise KeyboardInterrupt
    return result


# --------------------------------------------------------------------------------------
# The REPL

COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("/think", "", "thinking mode from the next message on"),
    SlashCommand("/nothink", "", "direct mode: answer without thinking"),
    SlashCommand("/budget", "N|off", "stop thinking after N tokens (off: no limit)"),
    SlashCommand("/system", "TEXT|none", "set the system prompt (alone: show it)"),
    SlashCommand(
        "/set", "KEY VALUE", "temp, top-p, top-k, min-p, presence-penalty, max-tokens, seed"
    ),
    SlashCommand("/clear", "", "forget the conversation (the system prompt stays)"),
    SlashCommand("/save", "FILE", "write the conversation to a JSON transcript"),
    SlashCommand("/load", "FILE", "restore a conversation from a JSON transcript"),
    SlashCommand("/stats", "", "numbers of the last answer, context use and settings"),
    SlashCommand("/help", "", "this list"),
    SlashCommand("/exit", "", "leave (also /bye or Ctrl-D)"),
    SlashCommand("/bye", "", "leave"),
)

HELP_KEYS = (
    'Enter sends · Alt+Enter (or Esc, Enter) adds a line · a message starting with """ '
    'goes on until a line ending with """ · Ctrl-C stops an answer · Ctrl-D leaves'
)


class _Exit(Exception):
    pass


class Repl:
    """The interactive loop: read, run a command or a turn, repeat."""

    def __init__(
        self,
        engine: Engine,
        conv: Conversation,
        out: ui.Renderer,
        prompt: ui.ChatPrompt,
        say: Callable[[str], None] = ui.info,
    ) -> None:
        self.engine = engine
        self.conv = conv
        self.out = out
        self.prompt = prompt
        self.say = say
        self.last: TurnResult | None = None
        self.totals = {"turns": 0, "generated": 0, "evaluated": 0}

    def mode_label(self) -> str:
        label = "thinking" if self.conv.mode == "think" else "direct"
        if self.conv.budget is not None and self.conv.mode == "think":
            label += f" · budget {self.conv.budget}"
        return label

    def run(self) -> int:
        while True:
            try:
                text = self.prompt.read(self.mode_label())
            except KeyboardInterrupt:
                self.say("Use /exit, /bye or Ctrl-D to leave.")
                continue
            except EOFError:
                return 0
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/") and "\n" not in text.strip():
                    self.command(text.strip())
                else:
                    self.turn(text)
            except _Exit:
                return 0
            except errors.QwenrunError as err:
                # In a session, a bad command or a failed turn is reported and the chat goes on.
                self.say(f"{err.message}" + (f" ({err.hint})" if err.hint else ""))

    def turn(self, text: str) -> None:
        cancel = threading.Event()
        with sigint_sets(cancel):
            result = run_turn(self.engine, self.conv, self.out, text, cancel=cancel)
        self.last = result
        self.totals["turns"] += 1
        if result.stats is not None:
            self.totals["generated"] += result.stats.generated_tokens
            self.totals["evaluated"] += result.stats.eval_prompt_tokens

    # ---- commands

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = {
            "/think": self._think,
            "/nothink": self._nothink,
            "/budget": self._budget,
            "/system": self._system,
            "/set": self._set,
            "/clear": self._clear,
            "/save": self._save,
            "/load": self._load,
            "/stats": self._stats,
            "/help": self._help,
            "/?": self._help,
            "/exit": self._exit,
            "/bye": self._exit,
            "/quit": self._exit,
        }.get(name.lower())
        if handler is None:
            raise errors.UsageError(f"unknown command {name}", hint="/help lists the commands")
        handler(arg)

    def _think(self, _arg: str) -> None:
        self.conv.set_mode("think")
        self.say(f"Thinking mode. {self.conv.profile.name} {self.conv.profile.describe_modes()}.")

    def _nothink(self, _arg: str) -> None:
        self.conv.set_mode("direct")
        self.say("Direct mode: answers without thinking.")

    def _budget(self, arg: str) -> None:
        if arg.lower() in ("off", "none", ""):
            self.conv.set_budget(None)
            self.say("Thinking budget off.")
            return
        try:
            n = int(arg)
        except ValueError:
            raise errors.UsageError(
                f"/budget needs a number of tokens or off, not {arg!r}"
            ) from None
        self.conv.set_budget(n)
        if self.conv.profile.thinking == "direct":
            self.say(f"Budget set, but {self.conv.profile.name} never thinks.")
        else:
            self.say(f"Thinking stops after {n} tokens.")

    def _system(self, arg: str) -> None:
        if not arg:
            self.say(
                f"System prompt: {self.conv.system}" if self.conv.system else "No system prompt."
            )
            return
        self.conv.system = None if arg.lower() == "none" else arg
        self.say("System prompt removed." if self.conv.system is None else "System prompt set.")

    def _set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise errors.UsageError("/set needs a name and a value", hint="e.g. /set temp 0.7")
        self.conv.set(key, value.strip())
        self.say(f"{key} = {value.strip()}")

    def _clear(self, _arg: str) -> None:
        self.conv.clear()
        self.say("Conversation cleared.")

    def _save(self, arg: str) -> None:
        if not arg:
            raise errors.UsageError("/save needs a file name", hint="e.g. /save chat.json")
        path = Path(arg).expanduser()
        self.conv.save(path)
        self.say(f"Saved {_plural(len(self.conv.turns), 'turn')} to {path}.")

    def _load(self, arg: str) -> None:
        if not arg:
            raise errors.UsageError("/load needs a file name", hint="e.g. /load chat.json")
        path = Path(arg).expanduser()
        notes = self.conv.load(path)
        self.say(f"Loaded {_plural(len(self.conv.turns), 'turn')} from {path}.")
        for note in notes:
            self.say(note)

    def _stats(self, _arg: str) -> None:
        for line in self.stats_lines():
            self.say(line)

    def stats_lines(self) -> list[str]:
        conv, eng = self.conv, self.engine
        lines = [
            f"model      {conv.profile.name} · {conv.profile.describe_modes()}",
            f"mode       {self.mode_label()}",
            f"context    {eng.cached_tokens} of {eng.n_ctx} tokens in use"
            f" · {_plural(len(conv.turns), 'turn')}",
            f"sampling   {_describe_sampling(conv.sampling())}"
            + (f" · max-tokens {conv.max_tokens}" if conv.max_tokens else ""),
            f"session    {_plural(self.totals['turns'], 'answer')}"
            f" · {self.totals['generated']} tokens generated"
            f" · {self.totals['evaluated']} prompt tokens evaluated",
        ]
        if self.last is not None and self.last.stats is not None:
            lines.append(f"last       {_describe_stats(self.last.stats)}")
            if self.last.thinking_tokens:
                lines.append(
                    f"thinking   {self.last.thinking_tokens} tokens in "
                    f"{self.last.thinking_seconds:.1f} s"
                )
        else:
            lines.append("last       no answer yet")
        return lines

    def _help(self, _arg: str) -> None:
        width = max(len(c.name) + len(c.args) + 1 for c in COMMANDS)
        for c in COMMANDS:
            self.say(f"{(c.name + ' ' + c.args).strip():<{width}}  {c.help}")
        self.say(HELP_KEYS)

    def _exit(self, _arg: str) -> None:
        raise _Exit


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe_sampling(s: SamplingParams) -> str:
    text = f"temp {s.temperature:g} · top-p {s.top_p:g} · top-k {s.top_k} · min-p {s.min_p:g}"
    if s.presence_penalty:
        text += f" · presence-penalty {s.presence_penalty:g}"
    if s.seed is not None:
        text += f" · seed {s.seed}"
    return text


def _describe_stats(s: GenStats) -> str:
    return (
        f"{s.prompt_tokens} prompt tokens ({s.eval_prompt_tokens} evaluated) · "
        f"{s.generated_tokens} generated · TTFT {s.ttft_ms:.0f} ms · "
        f"prefill {s.prefill_tok_s:,.0f} tok/s · decode {s.decode_tok_s:.1f} tok/s · "
        f"llama.cpp eval {s.llama_eval_ms:.0f} ms, sampling {s.llama_sample_ms:.0f} ms"
    )


def repl(
    engine: Engine,
    conv: Conversation,
    out: ui.Renderer,
    *,
    prompt: ui.ChatPrompt | None = None,
) -> int:
    """Run the chat loop until /exit, /bye or Ctrl-D; returns the exit status."""
    if prompt is None:
        config.ensure_home()
        prompt = ui.ChatPrompt(COMMANDS, config.history_file())
    loop = Repl(engine, conv, out, prompt)
    ui.info(
        f"{conv.profile.name} {conv.profile.describe_modes()}. "
        f"Mode: {loop.mode_label()}. /help for commands, Ctrl-D to leave."
    )
    return loop.run()
