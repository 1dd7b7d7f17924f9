"""The program's standard streams, set up once when the command line starts (`cli.main`).

Contract: `setup()` prepares the two streams (and forgets any earlier `--json`). Stdin keeps
the bytes that are not UTF-8 as lone surrogates whatever the locale (Python decodes them so
only in some locales, such as C and C.UTF-8, and raises in others, such as en_US.UTF-8), so
that `text.clean` finds and replaces them where the text enters, instead of a decoding error
ending the program. Stdout becomes a `GuardedStdout`: a write or flush the system refuses (a
full disk, `> /dev/full`; an I/O error; a stdout that was closed, `>&-`) raises
`errors.OutputError`, which `cli` says in one line with a non-zero exit. A reader that went
away (EPIPE, `| head -c 1`) is left alone: typer's standalone mode ends that quietly. After a
failure the guard drops whatever is still to be written, so the interpreter's last flush at
exit does not fail a second time. `flush()` writes out what is still buffered while the command
can still say it failed (a pipe or a file is written in blocks: `list --json > /dev/full` fails
only then); a reader that left ends it quietly, exit 1, as typer does. `write_last(text)` is
for the error path: written if it can be, never a second error. `json_option` is every
command's `--json`; `json_asked()` says whether it was given, so that `cli` can write a failure
as JSON too.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from typing import Any, NoReturn, TextIO

from qwenrun import errors


class GuardedStdout:
    """Stdout whose failed writes are one qwenrun error (see the module docstring); every
    other attribute is the wrapped stream's."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self.failed = False

    def _fail(self, exc: OSError | None) -> NoReturn:
        self.failed = True
        if exc is None:
            raise errors.OutputError(
                "cannot write the output: stdout is closed",
                hint="send it somewhere: a file (> out.txt), a pipe, the terminal",
            )
        raise errors.OutputError(
            f"cannot write the output: {(exc.strerror or str(exc)).lower()}",
            hint="free some space, or send it to a file on another disk",
        )

    def _guarded(self, name: str, *args: Any) -> Any:
        if self.failed:
            return None  # what could not be written is lost; the error was said once
        if self._stream is None:
            self._fail(None)
        try:
            return getattr(self._stream, name)(*args)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # the reader left: typer ends that quietly
            if exc.errno == errno.EBADF:
                self._fail(None)
            self._fail(exc)

    def write(self, text: str) -> int:
        written = self._guarded("write", text)
        return len(text) if written is None else int(written)

    def writelines(self, lines: Any) -> None:
        self._guarded("writelines", lines)

    def flush(self) -> None:
        self._guarded("flush")

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


_json_given: list[bool] = []  # noted by `--json`'s callback as typer reads the options


def _note_json(value: bool) -> bool:
    _json_given.append(value)
    return value


def json_option(help: str) -> Any:
    """A command's `--json` (`typer.Option`); `json_asked()` then says whether it was given."""
    import typer

    return typer.Option(False, "--json", help=help, callback=_note_json)


def json_asked() -> bool:
    return any(_json_given)


def _discard() -> None:
    """Point stdout's descriptor at /dev/null: what is still buffered goes nowhere, quietly."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def flush() -> None:
    """Write out what stdout still buffers: an `OutputError` if it cannot be; a reader that
    left (EPIPE) ends the program quietly with exit 1, as typer's standalone mode does."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard()
        sys.exit(1)


def write_last(text: str) -> None:
    """`text` on stdout if it can be written; nothing more if not (the error path: the
    failure was already said on stderr)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (errors.OutputError, OSError):
        _discard()


def setup() -> None:
    """Stdin that keeps undecodable bytes for `text.clean`; stdout that fails in one line."""
    _json_given.clear()  # a new command line: --json not seen yet
    if isinstance(sys.stdin, io.TextIOWrapper) and sys.stdin.errors != "surrogateescape":
        # Only before anything was read; the locale's encoding stays as it is.
        sys.stdin.reconfigure(errors="surrogateescape")
    if not isinstance(sys.stdout, GuardedStdout):
        sys.stdout = GuardedStdout(sys.stdout)
