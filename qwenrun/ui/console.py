"""The consoles qwenrun writes through, and chrome: notices, the start-up lines.

Contract: one rich `Console` on stderr for everything that is not the answer (headers,
notices, stats, progress), created on first use; a plain one for pipes; a stdout console
for tables (plain text at a fixed width when stdout is not a terminal). `printable` strips
control characters from model text before it reaches a terminal. Nothing here decides
anything.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from rich.console import Console, RenderableType
from rich.text import Text

PIPE_WIDTH = 120

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


# Control characters other than newline and tab, dropped before text reaches a terminal: a
# model's output must not move the cursor, clear the screen or set the window title.
_CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)])


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def info(text: str, *, style: str = "dim") -> None:
    """A line of chrome on stderr (plain when stderr is not a terminal)."""
    console().print(Text(text, style=style))


def show_startup(model: str, lines: Iterable[str] = (), *, facts: Iterable[str] = ()) -> None:
    """The start of chat and serve (and of a verbose run): `qwenrun · MODEL · fact · …` on one
    line (quant, where the experts are, speed, context), then one dim line each of `lines`
    (the plan's reasons, which callers give only with --verbose; serve's ready line)."""
    con = console()
    head = Text.assemble(("qwenrun", "bold cyan"), " · ", (model, "bold"))
    for fact in facts:
        head.append(f" · {fact}")
    con.print(head)
    for line in lines:
        con.print(Text(f"  {line}", style="dim"))


def stdout_console(file: TextIO | None = None) -> Console:
    """For tables on stdout: colour on a terminal, plain text of a fixed width elsewhere."""
    out = file or sys.stdout
    tty = out.isatty()
    return Console(
        file=out,
        highlight=False,
        no_color=not tty,
        force_terminal=tty,
        width=None if tty else PIPE_WIDTH,
    )


def show(renderable: RenderableType, file: TextIO | None = None) -> None:
    stdout_console(file).print(renderable)
