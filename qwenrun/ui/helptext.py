"""`--help` as most command lines write it: the terminal's width, the usual metavars.

Contract: presentation only. `App` is typer's `Typer` with plain help (click's formatter, not
rich's boxes: a box at 80 columns, with columns for short, long, negative and type, left an
option's words about 20 characters and wrapped them line after line), laid out at the
terminal's width (`max_content_width` lifts click's 80-column cap; a pipe gets 80 or
$COLUMNS), and every command it declares a `Command`. A `Command` names values the usual way
(`--ctx INTEGER`, `--system TEXT`, `MODEL`), writes no type tag after a flag or an argument
(typer's `<bool>`, `<str>`), shows `MODEL [PROMPT]` in its usage line, and lists its whole
first line in the command list instead of cutting it at "...".
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer import _click
from typer.core import TyperCommand

# A value's metavar by its Python type: click's own names.
_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN"}


def _usual_metavar(param: _click.Parameter) -> str:
    if param.param_type_name == "argument":
        return (param.name or "").upper()
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""  # a flag takes no value: nothing to name
    bare = getattr(param, "bare_type", None)
    kind = str(bare()) if callable(bare) else "value"
    return _METAVARS.get(kind, kind.upper())


class Command(TyperCommand):
    """A typer command whose help reads like click's and GNU tools' (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.help and not self.short_help:
            # The whole first paragraph: the command list wraps it rather than cutting it.
            self.short_help = " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())
        for param in self.params:
            if param.metavar is None:
                param.metavar = _usual_metavar(param)

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument" and param.metavar:
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces

    def format_options(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        """typer's two sections, an argument named by its metavar alone."""
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                sections["Arguments"].append((param.metavar or record[0], record[1]))
            else:
                sections["Options"].append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class App(typer.Typer):
    """typer's app with plain help at the terminal's width, whose commands are `Command`s."""

    def __init__(self, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("context_settings", None) or {})
        settings.setdefault("max_content_width", 10_000)  # the terminal's width, whatever it is
        super().__init__(rich_markup_mode=None, context_settings=settings, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["cls"] = kwargs.get("cls") or Command
        return super().command(*args, **kwargs)
