"""Everything qwenrun shows: the one stderr Console, turn renderers, the chat prompt, progress.

Contract: this module owns presentation only. The answer goes to stdout, and only the answer;
thinking, headers, stats, notices and progress go to stderr. Three renderers share one
interface (`Renderer`), so the REPL and one-shot `qwenrun run` print a turn the same way:

- `TTYRenderer` (stdout is a terminal): thinking streams dim under a "Thinking" header and is
  folded to one line when it ends (`Thought for 4.2 s · 312 tokens`) unless shown; the answer
  streams; a dim stats line follows.
- `PlainRenderer` (stdout is a pipe or file): the answer on stdout with no escape codes;
  thinking on stderr only when asked for; stats on stderr only when asked for.
- `JsonRenderer`: nothing while streaming, then one JSON object on stdout.

It also builds the prompt_toolkit session of the REPL (history, multi-line keys, slash-command
completion) and the load-progress display. It never runs the model, renders templates or
decides anything about a conversation; `chat.py` calls it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

    from qwenrun import download
    from qwenrun.backend import GenStats

_err_console: Console | None = None


def console() -> Console:
    """The one Console for chrome (headers, stats, notices), writing to stderr."""
    global _err_console
    if _err_console is None:
        _err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err_console


def plain_console(file: TextIO | None = None) -> Console:
    """A Console that never writes escape codes (stderr of a piped run)."""
    return Console(
        file=file or sys.stderr,
        force_terminal=False,
        no_color=True,
        highlight=False,
        soft_wrap=True,
    )


# --------------------------------------------------------------------------------------
# What a renderer is told


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


class Renderer(Protocol):
    def notice(self, text: str) -> None: ...
    def thinking(self, text: str) -> None: ...
    def thinking_done(self, seconds: float, tokens: int) -> None: ...
    def answer(self, text: str) -> None: ...
    def turn_done(self, view: TurnResult) -> None: ...
    def abort(self) -> None: ...


# Control characters other than newline and tab, dropped before text reaches a terminal: a
# model's output must not move the cursor, clear the screen or set the window title.
_CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)])


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def format_stats(stats: GenStats) -> str:
    """`TTFT 0.21 s · prefill 812 tok/s · decode 41.3 tok/s · 128 tokens`."""
    parts = [f"TTFT {stats.ttft_ms / 1000:.2f} s"]
    if stats.eval_prompt_tokens:
        parts.append(f"prefill {stats.prefill_tok_s:,.0f} tok/s")
    if stats.generated_tokens > 1:
        parts.append(f"decode {stats.decode_tok_s:.1f} tok/s")
    parts.append(f"{stats.generated_tokens} tokens")
    return " · ".join(parts)


def format_thought(seconds: float, tokens: int) -> str:
    return f"Thought for {seconds:.1f} s · {tokens} tokens"


def _ending_note(view: TurnResult) -> str | None:
    if view.finish_reason == "cancelled":
        return "stopped"
    if view.finish_reason == "length":
        return "cut at the token limit"
    return None


# --------------------------------------------------------------------------------------
# Terminal


class _ThinkingPanel:
    """A rich renderable: the "Thinking" header and the last lines of the thinking so far."""

    def __init__(self, max_lines: int, width: int) -> None:
        self.text = ""
        self.started = time.monotonic()
        self.max_lines = max_lines
        # Only a tail that surely fills the panel is kept: each refresh wraps all of it, and
        # a long block must cost no more per refresh (or per piece) than a short one.
        self._keep = (max_lines + 2) * max(width, 20)

    def add(self, text: str) -> None:
        self.text += text
        if len(self.text) > 2 * self._keep:
            self.text = self.text[-self._keep :]

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        header = Text.assemble(("Thinking", "bold dim"), (f"  {elapsed:.1f} s", "dim"))
        body = Text(self.text, style="dim")
        return Group(header, _last_lines(body, self.max_lines))


class _LastLines:
    def __init__(self, text: Text, n: int) -> None:
        self.text, self.n = text, n

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Text]:
        lines = self.text.wrap(console, options.max_width)
        yield from list(lines)[-self.n :]


def _last_lines(text: Text, n: int) -> _LastLines:
    return _LastLines(text, n)


class TTYRenderer:
    """Streams to a terminal: dim thinking (folded when done), the answer, a stats line."""

    def __init__(
        self,
        *,
        out: TextIO | None = None,
        err: Console | None = None,
        show_thinking: bool = False,
        show_stats: bool = True,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or console()
        self.show_thinking = show_thinking
        self.show_stats = show_stats
        self._live: Live | None = None
        self._panel: _ThinkingPanel | None = None
        self._thinking_open = False
        self._answer_tail = "\n"

    def notice(self, text: str) -> None:
        self._close_live()
        self.err.print(Text(text, style="yellow"))

    def thinking(self, text: str) -> None:
        if self.show_thinking:
            if not self._thinking_open:
                self.err.print(Text("Thinking", style="bold dim"))
                self._thinking_open = True
            self.err.print(Text(printable(text), style="dim"), end="")
            return
        if self._live is None:
            self._panel = _ThinkingPanel(
                max_lines=max(3, min(10, self.err.height - 4)), width=self.err.width
            )
            self._live = Live(
                self._panel,
                console=self.err,
                transient=True,
                refresh_per_second=8,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        assert self._panel is not None
        self._panel.add(printable(text))

    def thinking_done(self, seconds: float, tokens: int) -> None:
        self._close_live()
        if self.show_thinking and self._thinking_open:
            self.err.print()
        self._thinking_open = False
        self.err.print(Text(format_thought(seconds, tokens), style="dim italic"))

    def answer(self, text: str) -> None:
        self._close_live()
        text = printable(text)
        self.out.write(text)
        self.out.flush()
        self._answer_tail = text or self._answer_tail

    def turn_done(self, view: TurnResult) -> None:
        self._close_live()
        if not self._answer_tail.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        self._answer_tail = "\n"
        line = format_stats(view.stats) if (self.show_stats and view.stats) else ""
        note = _ending_note(view)
        if note:
            line = f"[{note}] {line}".rstrip()
        if line:
            self.err.print(Text(line, style="dim"))

    def abort(self) -> None:
        """The turn failed midway: leave the screen tidy for the error and the next prompt."""
        self._close_live()
        if not self._answer_tail.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        self._answer_tail = "\n"

    def _close_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._panel = None


# --------------------------------------------------------------------------------------
# Pipes and JSON


class PlainRenderer:
    """For pipes: only the answer on stdout; thinking and stats on stderr when asked for."""

    def __init__(
        self,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        show_thinking: bool = False,
        show_stats: bool = False,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.show_thinking = show_thinking
        self.show_stats = show_stats
        self._answer_tail = "\n"
        self._thinking_tail = "\n"

    def notice(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def thinking(self, text: str) -> None:
        if self.show_thinking:
            self.err.write(text)
            self.err.flush()
            self._thinking_tail = text

    def thinking_done(self, seconds: float, tokens: int) -> None:
        if self.show_thinking and not self._thinking_tail.endswith("\n"):
            self.err.write("\n")
            self.err.flush()
        self._thinking_tail = "\n"

    def answer(self, text: str) -> None:
        # Flushed per piece: a reader (`| head -c 1`, `| cat`) sees the stream as it comes.
        self.out.write(text)
        self.out.flush()
        self._answer_tail = text

    def turn_done(self, view: TurnResult) -> None:
        if not self._answer_tail.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        self._answer_tail = "\n"
        if self.show_stats and view.stats:
            note = _ending_note(view)
            prefix = f"[{note}] " if note else ""
            self.err.write(prefix + format_stats(view.stats) + "\n")
            self.err.flush()

    def abort(self) -> None:
        if not self._answer_tail.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        self._answer_tail = "\n"


class JsonRenderer:
    """Prints one object per turn: answer, thinking, stats, and whatever `extra` holds."""

    def __init__(self, *, out: TextIO | None = None, extra: dict[str, Any] | None = None) -> None:
        self.out = out or sys.stdout
        self.extra = dict(extra or {})
        self.notices: list[str] = []

    def notice(self, text: str) -> None:
        self.notices.append(text)

    def thinking(self, text: str) -> None:
        pass

    def thinking_done(self, seconds: float, tokens: int) -> None:
        pass

    def answer(self, text: str) -> None:
        pass

    def turn_done(self, view: TurnResult) -> None:
        doc: dict[str, Any] = {
            "answer": view.answer,
            "thinking": view.thinking,
            "stats": view.stats.as_dict() if view.stats else {},
            "finish_reason": view.finish_reason,
            "mode": view.mode,
            **self.extra,
            **view.extra,
        }
        if self.notices:
            doc["notices"] = list(self.notices)
        self.out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.out.flush()
        self.notices.clear()

    def abort(self) -> None:
        # No object for a failed turn: the error goes to stderr and the exit code says it.
        self.notices.clear()


def make_renderer(
    *,
    as_json: bool = False,
    show_thinking: bool = False,
    show_stats: bool | None = None,
    extra: dict[str, Any] | None = None,
    out: TextIO | None = None,
) -> Renderer:
    """The renderer for where stdout goes: JSON when asked, TTY on a terminal, else plain.

    `show_stats=None` means: yes on a terminal, no on a pipe.
    """
    out = out or sys.stdout
    if as_json:
        return JsonRenderer(out=out, extra=extra)
    if out.isatty():
        return TTYRenderer(out=out, show_thinking=show_thinking, show_stats=show_stats is not False)
    return PlainRenderer(out=out, show_thinking=show_thinking, show_stats=bool(show_stats))


# --------------------------------------------------------------------------------------
# Chrome outside a turn


def info(text: str, *, style: str = "dim") -> None:
    """A line of chrome on stderr (plain when stderr is not a terminal)."""
    console().print(Text(text, style=style))


def show_startup(model: str, lines: Iterable[str]) -> None:
    """What was chosen and why: the model, then one dim line per reason."""
    con = console()
    con.print(Text.assemble(("qwenrun", "bold cyan"), " · ", (model, "bold")))
    for line in lines:
        con.print(Text(f"  {line}", style="dim"))


@contextmanager
def load_progress(label: str = "Loading weights") -> Iterator[Callable[[float], None]]:
    """A progress bar on a terminal stderr while llama.cpp loads; a no-op callback elsewhere.

    Yields the callback for `Engine.load(on_progress=...)` (fractions 0.0 to 1.0).
    """
    con = console()
    if not con.is_terminal:
        yield lambda _p: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
    )
    task = progress.add_task(label, total=1.0)
    with progress:
        yield lambda p: progress.update(task, completed=min(max(p, 0.0), 1.0))


# --------------------------------------------------------------------------------------
# The REPL's prompt

SET_KEYS = ("temp", "top-p", "top-k", "min-p", "presence-penalty", "max-tokens", "seed")


@dataclass(frozen=True)
class SlashCommand:
    name: str
    args: str
    help: str


def _command_completer(commands: Sequence[SlashCommand]) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    names = [c.name for c in commands]

    class SlashCompleter(Completer):
        """Completes `/command` names, `/set` keys and `/budget off`; nothing in messages."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            words = text.split(" ")
            if len(words) == 1:
                for name in names:
                    if name.startswith(words[0]):
                        yield Completion(name, start_position=-len(words[0]))
                return
            choices: tuple[str, ...] = ()
            if words[0] == "/set" and len(words) == 2:
                choices = SET_KEYS
            elif words[0] == "/budget" and len(words) == 2:
                choices = ("off",)
            for choice in choices:
                if choice.startswith(words[-1]):
                    yield Completion(choice, start_position=-len(words[-1]))

    return SlashCompleter()


def _key_bindings() -> Any:
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @Condition
    def open_block() -> bool:
        from prompt_toolkit.application import get_app

        return triple_quote_open(get_app().current_buffer.text)

    # Enter inside an unclosed `"""` block adds a line instead of sending (as in Ollama).
    @kb.add("enter", filter=open_block)
    def _newline_in_block(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    # Alt+Enter (or Esc then Enter) always adds a line.
    @kb.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return kb


def triple_quote_open(text: str) -> bool:
    """Whether `text` starts a triple-quote block that is not yet closed."""
    stripped = text.lstrip()
    if not stripped.startswith('"""'):
        return False
    rest = stripped[3:]
    return not rest.rstrip().endswith('"""')


def strip_triple_quotes(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith('"""'):
        stripped = stripped[3:]
        if stripped.rstrip().endswith('"""'):
            stripped = stripped.rstrip()[:-3]
    return stripped.strip("\n")


class ChatPrompt:
    """The REPL's input line: prompt_toolkit on a terminal, plain lines from a pipe.

    `read()` returns one message or command; it raises `KeyboardInterrupt` on Ctrl-C and
    `EOFError` on Ctrl-D (or the end of piped input).
    """

    def __init__(
        self,
        commands: Sequence[SlashCommand],
        history_file: Path | None,
        *,
        interactive: bool | None = None,
        stdin: TextIO | None = None,
    ) -> None:
        self.stdin = stdin or sys.stdin
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self._session: PromptSession[str] | None = None
        if self.interactive:
            self._session = self._make_session(commands, history_file)

    @staticmethod
    def _make_session(
        commands: Sequence[SlashCommand], history_file: Path | None
    ) -> PromptSession[str]:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history: Any = InMemoryHistory()
        if history_file is not None:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        # With the answers going to a file (`qwenrun chat M > out.txt`), the prompt is drawn
        # on the terminal through stderr, so the file gets answers only.
        output = None
        if not sys.stdout.isatty() and sys.stderr.isatty():
            from prompt_toolkit.output import create_output

            output = create_output(stdout=sys.stderr)
        return PromptSession(
            output=output,
            history=history,
            completer=_command_completer(commands),
            complete_while_typing=True,
            key_bindings=_key_bindings(),
            multiline=False,
            prompt_continuation=lambda width, _n, _soft: "." * (width - 1) + " ",
        )

    def read(self, mode_label: str = "") -> str:
        if self._session is not None:
            from prompt_toolkit.formatted_text import FormattedText

            text = self._session.prompt(
                ">>> ",
                rprompt=FormattedText([("fg:ansibrightblack", mode_label)]) if mode_label else None,
                placeholder=FormattedText(
                    [("fg:ansibrightblack", 'Send a message (/help for commands, """ for lines)')]
                ),
            )
            return strip_triple_quotes(text) if text.lstrip().startswith('"""') else text
        return self._read_plain()

    def _read_plain(self) -> str:
        line = self.stdin.readline()
        if not line:
            raise EOFError
        if not triple_quote_open(line):
            return (
                strip_triple_quotes(line) if line.lstrip().startswith('"""') else line.rstrip("\n")
            )
        lines = [line]
        while triple_quote_open("".join(lines)):
            more = self.stdin.readline()
            if not more:
                break
            lines.append(more)
        return strip_triple_quotes("".join(lines))


# --------------------------------------------------------------------------------------
# Downloads


def confirm_pull(target: download.PullTarget, *, ask: bool) -> bool:
    """Say what will be fetched (and its size); on a terminal, ask when qwenrun chose it."""
    from qwenrun import download

    n = len(target.quant.files)
    what = (
        f"{target.reference} · {target.repo} · {download.format_bytes(target.total_size)}"
        f" in {n} file{'s' if n > 1 else ''}"
    )
    if download.cached_copy(target) is not None:
        info(f"{what} · already downloaded")
        return True
    info(what)
    if not ask:
        return True
    import typer

    return typer.confirm("Download it?", default=True, err=True)


@contextmanager
def pull_progress() -> Iterator[Callable[[download.PullProgress], None]]:
    """One progress bar for the whole quant on a terminal; a line per file elsewhere."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    con = console()
    progress: Progress | None = None
    task = None
    last_file = (0, "")

    def on_progress(p: download.PullProgress) -> None:
        nonlocal progress, task, last_file
        verb = "verifying" if p.phase == "verify" else "downloading"
        label = f"{verb} {p.file_index}/{p.n_files} {p.file.rsplit('/', 1)[-1]}"
        if not con.is_terminal:
            if (p.file_index, p.phase) != last_file:
                last_file = (p.file_index, p.phase)
                info(label)
            return
        if progress is None:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=False),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=con,
                transient=False,
            )
            progress.start()
            # Start at the bytes already there, so a resumed pull's speed is not inflated.
            task = progress.add_task(label, total=p.total_bytes, completed=p.done_bytes)
        assert task is not None
        progress.update(task, description=label, completed=p.done_bytes)

    try:
        yield on_progress
    finally:
        if progress is not None:
            progress.stop()
