"""Turn renderers: how one streamed turn looks in a terminal, in a pipe, and as JSON.

Contract: presentation only. The answer goes to stdout, and only the answer; thinking, stats and
notices go to stderr (except as JSON: one object on stdout holds them all). Three renderers
implement `chat.Renderer`, so the REPL and one-shot `qwenrun run` show a turn the same way:

- `TTYRenderer` (stdout is a terminal): thinking streams dim under a "Thinking" header and is
  folded to one line when it ends (`Thought for 4.2 s · 312 tokens`) unless shown; the answer
  streams; a dim stats line follows.
- `PlainRenderer` (stdout is a pipe or file): the answer on stdout with no escape codes;
  thinking on stderr only when asked for; stats on stderr only when asked for.
- `JsonRenderer`: nothing while streaming, then one JSON object on stdout (the answer, the
  thinking, the stats, and the turn's notices); nothing for a turn that failed.

`make_renderer` picks the one for where stdout goes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from qwenrun.chat import Renderer, TurnResult
from qwenrun.ui.console import console, printable

if TYPE_CHECKING:
    from qwenrun.engine.values import GenStats


def format_stats(stats: GenStats) -> str:
    """`TTFT 0.21 s · prefill 812 tok/s · decode 41.3 tok/s · 128 tokens`; a prompt the disk
    cache gave says so (`prompt: 3,000 tokens from the disk cache in 0.06 s`): read, not
    evaluated, so no prefill speed is made of it."""
    parts = [f"TTFT {stats.ttft_ms / 1000:.2f} s"]
    if stats.reused_from == "disk":
        parts.append(
            f"prompt: {stats.reused_tokens:,} tokens from the disk cache"
            f" in {stats.reuse_ms / 1000:.2f} s"
        )
    if stats.eval_prompt_tokens > (1 if stats.reused_from == "disk" else 0):
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
