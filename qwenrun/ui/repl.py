"""The interactive chat loop: read a line, run a slash command or a turn, repeat.

Contract: `repl(engine, conv, out)` runs until /exit, /bye, /quit or Ctrl-D and returns the exit
status. A `QwenrunError` from a command or a turn is reported in one line and the loop goes on,
and so is a bug in a command (the conversation is intact); any other failure of a turn ends the
session, since the engine may be left in any state. Each line read passes `text.clean` (bytes
that were not UTF-8 become U+FFFD, said once); a command that takes nothing refuses what follows
it. Turns go through `chat.run_turn`; Ctrl-C during an answer cancels it (`chat.sigint_sets`),
at the prompt it says how to leave. `/save` and `/load` go through the conversation's transcript
functions (a failed one changes nothing). `/stats` shows the last answer's numbers, the context
the conversation takes (the next prompt before the message, whatever the engine's cache still
holds), the sampling in force, how many prompt tokens were reused and from where, and what the
checkpoints and the prompt cache on disk hold; its lines are built one fact each (`_stat`), so
new facts are one more line.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from qwenrun import config, errors, sampling, units
from qwenrun.chat import Conversation, Renderer, TurnResult, run_turn, sigint_sets
from qwenrun.engine.llama import Engine
from qwenrun.engine.values import CacheReport, GenStats, SamplingParams
from qwenrun.text import clean, notice
from qwenrun.ui.console import info
from qwenrun.ui.prompt import ChatPrompt, SlashCommand

COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("/think", "", "thinking mode from the next message on"),
    SlashCommand("/nothink", "", "direct mode: answer without thinking"),
    SlashCommand("/budget", "N|off", "stop thinking after N tokens (off: no limit)"),
    SlashCommand("/effort", "LEVEL|default", "reasoning effort, for models that have one"),
    SlashCommand("/system", "TEXT|none", "set the system prompt (alone: show it)"),
    SlashCommand("/set", "KEY VALUE", ", ".join(s.key for s in sampling.SET_SETTINGS)),
    SlashCommand("/clear", "", "forget the conversation (the system prompt stays)"),
    SlashCommand("/save", "FILE", "write the conversation to a JSON transcript"),
    SlashCommand("/load", "FILE", "restore a conversation from a JSON transcript"),
    SlashCommand("/stats", "", "numbers of the last answer, context use and settings"),
    SlashCommand("/help", "", "this list"),
    SlashCommand("/exit", "", "leave (also /bye or Ctrl-D)"),
    SlashCommand("/bye", "", "leave"),
)

# Commands that take nothing after them (their aliases too): anything there is refused,
# so that `/think extra` does not look as if "extra" did something.
_BARE = {c.name for c in COMMANDS if not c.args} | {"/?", "/quit"}

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
        out: Renderer,
        prompt: ChatPrompt,
        say: Callable[[str], None] = info,
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
        if self.conv.effort:
            label += f" · effort {self.conv.effort}"
        return label

    def run(self) -> int:
        while True:
            for note in self.prompt.take_notices():
                self.say(note)
            try:
                text = self.prompt.read(self.mode_label())
            except KeyboardInterrupt:
                self.say("Use /exit, /bye or Ctrl-D to leave.")
                continue
            except EOFError:
                return 0
            text, replaced = clean(text)  # bytes that were not UTF-8: �, said once
            if replaced:
                self.say(notice(replaced, "the message"))
            if not text.strip():
                continue
            is_command = text.lstrip().startswith("/") and "\n" not in text.strip()
            try:
                if is_command:
                    self.command(text.strip())
                else:
                    self.turn(text)
            except _Exit:
                return 0
            except errors.QwenrunError as err:
                # In a session, a bad command or a failed turn is reported and the chat goes on.
                self.say(f"{err.message}" + (f" ({err.hint})" if err.hint else ""))
            except Exception as err:
                if not is_command:
                    raise  # a turn that broke may have left the engine in any state
                # A bug in a command must not cost the conversation: say so and go on.
                if config.debug_enabled():
                    traceback.print_exc()
                name = text.split()[0]
                self.say(
                    f"{name} failed: {type(err).__name__}: {err} (a bug in qwenrun; "
                    "QWENRUN_DEBUG=1 shows where; the conversation is intact)"
                )

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
            "/effort": self._effort,
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
        if arg and name.lower() in _BARE:
            hint = "/budget N sets the thinking budget" if name.lower() == "/think" else None
            raise errors.UsageError(f"{name} takes nothing after it, not {arg!r}", hint=hint)
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
            int(arg)
        except ValueError:
            raise errors.UsageError(
                f"/budget needs a number of tokens or off, not {arg!r}"
            ) from None
        n = int(sampling.BY_KEY["budget"].parse(arg, "/budget"))  # its range, from the table
        self.conv.set_budget(n)
        self.say(self.conv.budget_note() or f"Thinking stops after {n} tokens.")

    def _effort(self, arg: str) -> None:
        """`/effort LEVEL` sets it, `/effort default` leaves it to the template, `/effort`
        alone shows it; a model whose template has no such setting is told so."""
        conv = self.conv
        if not conv.efforts:
            conv.set_effort(arg or "default")  # refused in one line: no such setting
        if arg:
            conv.set_effort(None if arg.lower() == "default" else arg)
        now = conv.effort or "the template's default"
        self.say(f"Reasoning effort: {now} (choices: {', '.join(conv.efforts)}).")

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
        # The engine's cache is left as it is: the next prompt reuses its system-prompt
        # prefix and drops the rest. /stats reports the conversation, not that cache.
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
        """`/stats`: one labelled line per fact (`_stat`); add a fact by adding a line."""
        conv = self.conv
        lines = [
            _stat("model", f"{conv.profile.name} · {conv.profile.describe_modes()}"),
            _stat("mode", self.mode_label()),
            _stat("context", self._context_use()),
            _stat(
                "sampling",
                _describe_sampling(conv.sampling())
                + (f" · max-tokens {conv.max_tokens:,}" if conv.max_tokens else ""),
            ),
            _stat(
                "session",
                f"{_plural(self.totals['turns'], 'answer')}"
                f" · {self.totals['generated']:,} tokens generated"
                f" · {self.totals['evaluated']:,} prompt tokens evaluated",
            ),
        ]
        if self.last is not None and self.last.stats is not None:
            lines.append(_stat("last", _describe_stats(self.last.stats)))
            if self.last.stats.reused_tokens:
                lines.append(_stat("reused", _describe_reuse(self.last.stats)))
            if self.last.thinking_tokens:
                lines.append(
                    _stat(
                        "thinking",
                        f"{self.last.thinking_tokens:,} tokens in "
                        f"{self.last.thinking_seconds:.1f} s",
                    )
                )
        else:
            lines.append(_stat("last", "no answer yet"))
        lines += _cache_lines(self.engine.cache_report())
        return lines

    def _context_use(self) -> str:
        """What the conversation takes of the context: the next prompt before the message
        (system prompt, kept turns, the template's frame), so /clear and /load show at once."""
        conv, n_ctx = self.conv, self.engine.n_ctx
        used = conv.context_tokens(self.engine)
        text = (
            f"{used:,} of {n_ctx:,} tokens before your next message"
            f" · {_plural(len(conv.turns), 'turn')}"
        )
        if used >= n_ctx:
            text += " · the oldest turns will be dropped to make room"
        return text

    def _help(self, _arg: str) -> None:
        width = max(len(c.name) + len(c.args) + 1 for c in COMMANDS)
        for c in COMMANDS:
            self.say(f"{(c.name + ' ' + c.args).strip():<{width}}  {c.help}")
        self.say(HELP_KEYS)

    def _exit(self, _arg: str) -> None:
        raise _Exit


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _stat(label: str, text: str) -> str:
    """One `/stats` line: the label in a column, then the fact."""
    return f"{label:<10} {text}"


_REUSED_FROM = {
    "cache": "still in the context",
    "checkpoint": "from a checkpoint",
    "disk": "from the prompt cache on disk",
}


def _describe_reuse(s: GenStats) -> str:
    where = _REUSED_FROM.get(s.reused_from, s.reused_from)
    took = f" in {s.reuse_ms / 1000:.2f} s" if s.reused_from == "disk" else ""
    return f"{s.reused_tokens:,} of {s.prompt_tokens:,} prompt tokens {where}{took}"


def _cache_lines(r: CacheReport) -> list[str]:
    """What the engine keeps so that prompts are not evaluated twice."""
    if r.checkpoints:
        ckpt = (
            f"{r.checkpoint_count} held · {units.gib(r.checkpoint_bytes)}"
            f" (at most {r.checkpoint_max_count}, {units.gib(r.checkpoint_max_bytes)})"
        )
    else:
        ckpt = "not needed: this model's cache goes back to any earlier token"
    lines = [_stat("checkpoint", ckpt)]
    d = r.disk
    if d is None:
        lines.append(_stat("disk cache", "off"))
    else:
        entries = f"{d.entries} {'entry' if d.entries == 1 else 'entries'}"
        lines.append(
            _stat(
                "disk cache",
                f"{entries} · {units.gib(d.bytes)} of {units.gib(d.cap)}"
                f" · {d.loaded_tokens:,} tokens loaded, {d.saved} saved this session"
                f" · {d.folder}",
            )
        )
    return lines


def _describe_sampling(params: SamplingParams) -> str:
    """Every sampler setting in force, in the table's order; the quiet ones only when set."""
    parts = []
    for s in sampling.SAMPLER_SETTINGS:
        value = getattr(params, s.field)
        if not (s.quiet_at_default and value == s.default):
            parts.append(f"{s.key} {s.show(value)}")
    return " · ".join(parts)


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
    out: Renderer,
    *,
    prompt: ChatPrompt | None = None,
) -> int:
    """Run the chat loop until /exit, /bye or Ctrl-D; returns the exit status."""
    if prompt is None:
        prompt = ChatPrompt(
            COMMANDS,
            config.history_file(),
            history_hint="QWENRUN_HOME chooses where it is kept",
        )
    loop = Repl(engine, conv, out, prompt)
    info(
        f"{conv.profile.name} {conv.profile.describe_modes()}. "
        f"Mode: {loop.mode_label()}. /help for commands, Ctrl-D to leave."
    )
    note = conv.budget_note()  # --budget on a model that never thinks: as /budget says
    if note:
        info(note)
    return loop.run()
