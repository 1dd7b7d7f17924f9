"""The REPL's input line: prompt_toolkit on a terminal, plain lines from a pipe.

Contract: `ChatPrompt.read()` returns one message or slash command. On a terminal it is a
prompt_toolkit session with history (kept across sessions), slash-command completion,
Alt+Enter for a new line and Ollama's triple-quote blocks; from a pipe each line is a message
and triple-quote blocks still work. Ctrl-C raises `KeyboardInterrupt`, Ctrl-D (or the end of
the input) `EOFError`. History that cannot be kept (its folder is a file, or not writable)
never stops the chat: the session keeps it in memory, and `take_notices()` says once why it
is off. The session never asks the terminal where its cursor is (CPR): a terminal that does
not answer would otherwise hold the keyboard in raw mode after Enter and swallow a Ctrl-C
meant for the answer. What the commands do is `ui/repl.py`'s business.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qwenrun import sampling

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

SET_KEYS = tuple(s.key for s in sampling.SET_SETTINGS)


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
        history_hint: str = "",
    ) -> None:
        self.stdin = stdin or sys.stdin
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self._notices: list[str] = []
        self._history_hint = history_hint
        self._session: PromptSession[str] | None = None
        if self.interactive:
            self._session = self._make_session(commands, self._history(history_file))

    def take_notices(self) -> list[str]:
        """What the user should know about the prompt itself (history turned off), once."""
        notices, self._notices = self._notices, []
        return notices

    def _history_off(self, why: str) -> None:
        hint = f" ({self._history_hint})" if self._history_hint else ""
        self._notices.append(
            f"History is off: {why}{hint}. Up and down still recall this session's messages."
        )

    def _history(self, history_file: Path | None) -> Any:
        """A file-backed history when the file can be written, else one in memory."""
        from prompt_toolkit.history import InMemoryHistory

        if history_file is None:
            return InMemoryHistory()
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            with open(history_file, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            self._history_off(_unwritable(history_file, exc))
            return InMemoryHistory()
        return _kept_history(history_file, self._history_off)

    @staticmethod
    def _make_session(commands: Sequence[SlashCommand], history: Any) -> PromptSession[str]:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.output import create_output
        from prompt_toolkit.output.vt100 import Vt100_Output

        # With the answers going to a file (`qwenrun chat M > out.txt`), the prompt is drawn
        # on the terminal through stderr, so the file gets answers only.
        screen = sys.stderr if not sys.stdout.isatty() and sys.stderr.isatty() else sys.stdout
        output = create_output(stdout=screen)
        if isinstance(output, Vt100_Output):
            # No cursor-position requests (CPR). After each Enter prompt_toolkit keeps the
            # terminal raw until the answer to its last request arrives, up to a second;
            # a terminal that never answers (many do not) thus swallows a Ctrl-C typed just
            # as the answer starts (a key then, not a signal: it surfaced at the next prompt
            # as "Use /exit…" while the answer ran on), delays every answer by that second
            # and prints a warning. What CPR buys, the rows left below the cursor, this
            # one-line prompt does not need.
            output.enable_cpr = False
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


def _unwritable(path: Path, exc: OSError) -> str:
    """Why `path` cannot be written, naming a file that stands where a folder should be."""
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                return f"{above} is a file, not a folder"
            break
    return f"cannot write {path} ({(exc.strerror or type(exc).__name__).lower()})"


def _kept_history(path: Path, off: Callable[[str], None]) -> Any:
    """prompt_toolkit's FileHistory that turns itself off, once, when the file fails later
    (removed, disk full): a history is never worth losing the conversation over."""
    from prompt_toolkit.history import FileHistory

    class KeptHistory(FileHistory):
        working = True

        def load_history_strings(self) -> Iterator[str]:
            try:
                yield from super().load_history_strings()
            except OSError as exc:
                self._fail(exc)

        def store_string(self, string: str) -> None:
            if not self.working:
                return
            try:
                super().store_string(string)
            except OSError as exc:
                self._fail(exc)

        def _fail(self, exc: OSError) -> None:
            if self.working:
                self.working = False
                off(_unwritable(path, exc))

    return KeptHistory(str(path))
