"""The `qwenrun` command line: parse, call the core, render, map errors to exit codes.

Contract: this module only wires things together. It never imports llama_cpp,
huggingface_hub or pynvml at module level (so `qwenrun --help` starts fast); commands
import what they need when they run. Every `QwenrunError` becomes one line on stderr
("error: <message>" plus "hint: <hint>" when there is one) and the exit code from
`EXIT_CODES`; `QWENRUN_DEBUG=1` shows the traceback instead. Nothing imports `cli`.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

import typer

from qwenrun import __version__, config, errors

app = typer.Typer(
    name="qwenrun",
    help="Run quantized Qwen MoE models locally, with experts placed for speed.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold tokens (HF_TOKEN): never print them in a traceback.
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One table from error type to exit code; the most specific class listed wins.
EXIT_CODES: dict[type[errors.QwenrunError], int] = {
    errors.UsageError: 2,
    errors.ModelNotFoundError: 3,
    errors.InvalidModelError: 3,
    errors.UnsupportedModelError: 3,
    errors.ContextOverflowError: 4,
    errors.DoesNotFitError: 4,
    errors.DownloadError: 5,
    errors.AuthError: 5,
    errors.IntegrityError: 5,
    errors.DiskSpaceError: 5,
    errors.OfflineError: 5,
    errors.BackendError: 6,
}


def exit_code_for(err: errors.QwenrunError) -> int:
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def _version_callback(value: bool) -> None:
    if value:
        print(f"qwenrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Run quantized Qwen MoE models locally, with experts placed for speed."""


def _fail(err: errors.QwenrunError) -> NoReturn:
    line = f"error: {err.message}"
    if err.hint:
        line += f" (hint: {err.hint})"
    # One line: a message with newlines in it would read as several errors.
    print(" ".join(line.split("\n")), file=sys.stderr)
    sys.exit(exit_code_for(err))


def _quiet_broken_pipe() -> NoReturn:
    # The reader went away (`| head -c 1`): point stdout at /dev/null so the interpreter's
    # final flush does not raise again, and end quietly.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    os._exit(0)


def main() -> None:
    """Console-script entry point."""
    debug = config.debug_enabled()
    try:
        app(standalone_mode=True)
    except errors.QwenrunError as err:
        if debug:
            traceback.print_exc()
        _fail(err)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# Commands are registered by importing their modules below.
