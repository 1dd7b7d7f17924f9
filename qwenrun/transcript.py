"""A conversation as values and as a file: its turns, its settings, the JSON transcript.

Contract: `Turn` is one exchange (the user's message, the answer, its thinking, the mode, cut or
not). A transcript's settings (its "settings" object and its "budget") are checked by the one
sampling table (`sampling.SETTINGS`), under any of their names, with the same ranges as `/set`,
the command line and the server; its reasoning "effort" need only be text here (the conversation
checks it against the model's template when it loads one). `write_file_atomically` writes all of
a file or nothing (a temporary file renamed over it) and creates no folder; `read_transcript`
checks a whole transcript before anything uses it, so a bad file changes nothing and the error
names the message and field at fault; its texts pass `text.clean` (what is not valid Unicode,
such as a JSON "\\ud800", becomes U+FFFD) and `Transcript.replaced` counts them. Every problem
with a file is a one-line `UsageError`, never an OSError or a ValueError. Nothing here renders
prompts or runs a model (`chat.py`).
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwenrun import errors, sampling, text
from qwenrun.atomic import write_atomic
from qwenrun.template import Mode

TRANSCRIPT_FORMAT = "qwenrun-transcript/1"


@dataclass
class Turn:
    user: str
    answer: str
    thinking: str = ""
    mode: Mode = "direct"
    cut: bool = False


# --------------------------------------------------------------------------------------
# Transcript files

# Far above any real transcript (a full 256k-token context is about a megabyte of text):
# a bigger file is not one, and reading it whole would only cost memory.
_MAX_TRANSCRIPT_BYTES = 64 * 1024 * 1024


def write_file_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, renamed over it,
    so a failed write leaves no half a file (and any earlier file as it was).

    Refuses, as a one-line UsageError, a missing folder (never created here: a typo must
    not make folders), a folder or a device in place of the file, and what the system
    refuses (permissions, a full disk).
    """
    if path.is_symlink():
        path = path.resolve()  # replace the file the link points to, not the link
    folder = path.parent
    problem = _folder_problem(folder)
    if problem:
        raise errors.UsageError(f"cannot save to {path}: {problem[0]}", hint=problem[1])
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _save_error(path, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise errors.UsageError(
            f"cannot save to {path}: it is a folder",
            hint=f"name a file in it, such as {path / 'chat.json'}",
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise errors.UsageError(
            f"cannot save to {path}: it is not a regular file", hint="name a .json file"
        )
    try:
        # A replaced file keeps its permissions.
        mode = stat.S_IMODE(st.st_mode) if st is not None else None
        write_atomic(path, text, durable=True, mode=mode)
    except OSError as exc:
        raise _save_error(path, exc) from None


def _folder_problem(folder: Path) -> tuple[str, str] | None:
    """Why files cannot be created in `folder`, and what to do (None: it is a folder)."""
    elsewhere = "save in a folder that exists"
    try:
        if stat.S_ISDIR(folder.stat().st_mode):
            return None
        return f"{folder} is a file, not a folder", elsewhere
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        return f"{folder}: {_reason(exc)}", elsewhere
    # Name the first part of the path that is in the way: a file, or the missing folder.
    missing = folder
    for above in folder.parents:
        if above.exists():
            if not above.is_dir():
                return f"{above} is a file, not a folder", elsewhere
            break
        missing = above
    return f"there is no folder {missing}", f"create it first (mkdir -p {folder}), or {elsewhere}"


def _save_error(path: Path, exc: OSError) -> errors.UsageError:
    hint = "the conversation is still here: save it somewhere else"
    if exc.errno == 28:  # ENOSPC
        hint = "free some disk space and save again, or save somewhere else"
    if exc.filename is not None and exc.filename2 is None and Path(exc.filename) != path:
        # The temporary file beside it could not be made (/proc, /sys): the file itself may
        # well exist. (A failed rename names both files, and is said as the system says it.)
        where = f"no new file can be made in {path.parent} ({_reason(exc)})"
        return errors.UsageError(f"cannot save to {path}: {where}", hint=hint)
    return errors.UsageError(f"cannot save to {path}: {_reason(exc)}", hint=hint)


def _reason(exc: OSError) -> str:
    """An OSError in words, without the path it repeats ("permission denied")."""
    return (exc.strerror or type(exc).__name__).lower()


def _read_document(path: Path) -> Any:
    """The parsed JSON of a transcript file, or a one-line UsageError saying why not."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise errors.UsageError(f"no such transcript: {path}") from None
    except OSError as exc:
        raise errors.UsageError(f"cannot read {path}: {_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise errors.UsageError(
            f"{path} is a folder, not a transcript", hint="name a .json file that /save wrote"
        )
    if not stat.S_ISREG(st.st_mode):
        raise errors.UsageError(f"{path} is not a regular file, not a transcript")
    if st.st_size > _MAX_TRANSCRIPT_BYTES:
        raise errors.UsageError(
            f"{path} is {st.st_size:,} bytes: too large to be a qwenrun transcript"
        )
    try:
        content = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise errors.UsageError(f"{path} is not a JSON transcript: it is not UTF-8 text") from None
    except OSError as exc:
        raise errors.UsageError(f"cannot read {path}: {_reason(exc)}") from None
    try:
        return json.loads(content)
    except json.JSONDecodeError as exc:
        raise errors.UsageError(f"{path} is not a JSON transcript: {exc}") from None
    except RecursionError:
        raise errors.UsageError(f"{path} is not a JSON transcript: nested too deeply") from None
    except ValueError:  # Python's limit on the digits of an integer (4,300 by default)
        raise errors.UsageError(
            f"{path} is not a qwenrun transcript: it holds a number with too many digits"
        ) from None


@dataclass(frozen=True)
class Transcript:
    """A transcript file, checked whole, ready to replace a conversation."""

    system: str | None
    turns: list[Turn]
    mode: Mode | None
    budget: int | None
    settings: dict[str, Any]
    max_tokens: int | None
    replaced: int = 0  # code points that were not valid Unicode, now U+FFFD (`text.clean`)
    effort: str | None = None  # the template's reasoning_effort (None: its default)


_ONE_ANSWER = "each user message must be followed by an answer"


def _parse(doc: Any, path: Path) -> Transcript:
    def bad(what: str, hint: str | None = None) -> errors.UsageError:
        return errors.UsageError(f"{path}: {what}", hint=hint)

    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise errors.UsageError(f"{path} is not a qwenrun transcript (no messages list)")
    fmt = doc.get("format")
    if fmt is not None and fmt != TRANSCRIPT_FORMAT:
        raise bad(f'"format" is {fmt!r}, not {TRANSCRIPT_FORMAT!r}')
    system = doc.get("system")
    if system is not None and not isinstance(system, str):
        raise bad(f'"system" should be text or null, not {system!r}')
    turns: list[Turn] = []
    question: str | None = None  # the user message waiting for its answer
    for n, msg in enumerate(doc["messages"], start=1):
        where = f"message {n}"
        if not isinstance(msg, dict):
            raise bad(f"{where} is not an object with a role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant"):
            raise bad(f'{where} has role {role!r}; expected "user" or "assistant"')
        if not isinstance(content, str):
            raise bad(f'{where} ({role}) has no "content" text')
        if role == "system":
            if n != 1:
                raise bad(f"{where} is a system message; only the first message may be one")
            system = system if "system" in doc else content
        elif role == "user":
            if question is not None:
                raise bad(f"{where} follows user message {n - 1}, which has no answer", _ONE_ANSWER)
            question = content
        else:
            if question is None:
                raise bad(f"{where} is an answer with no user message before it", _ONE_ANSWER)
            turns.append(_answer_turn(question, msg, content, f"{path}: {where}"))
            question = None
    if question is not None:
        raise bad("the last message is a user message with no answer", _ONE_ANSWER)
    mode = doc.get("mode")
    if mode not in (None, "think", "direct"):
        raise bad(f'"mode" should be "think" or "direct", not {mode!r}')
    budget = doc.get("budget")
    if budget is not None:
        limits = sampling.BY_KEY["budget"]
        try:
            budget = int(limits.check(budget))
        except errors.UsageError:
            raise bad(
                f'"budget" should be a number of tokens ({limits.range_text()}) or null, '
                f"not {budget!r}"
            ) from None
    raw = doc.get("settings")
    if raw is not None and not isinstance(raw, dict):
        raise bad(f'"settings" should be an object such as {{"temperature": 0.6}}, not {raw!r}')
    settings: dict[str, Any] = {}
    max_tokens: int | None = None
    for key, value in (raw or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"setting {key} should be a number, not {value!r}")
        try:
            setting, typed = sampling.read(key, value)
        except errors.UsageError as err:
            raise bad(f'"settings": {err.message}', err.hint) from None
        if setting.sampler:
            settings[setting.field] = typed
        else:
            max_tokens = int(typed)  # /set's one setting that is not the sampler's
    effort = doc.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise bad(f'"effort" should be text such as "medium", or null, not {effort!r}')
    return Transcript(system or None, turns, mode, budget, settings, max_tokens, effort=effort)


def _answer_turn(question: str, msg: dict[str, Any], content: str, where: str) -> Turn:
    """The turn an assistant message closes; its optional fields checked."""
    mode: Mode = msg.get("mode") or "direct"
    if mode not in ("think", "direct"):
        raise errors.UsageError(f'{where} has mode {mode!r}; expected "think" or "direct"')
    thinking = msg.get("thinking") or ""
    if not isinstance(thinking, str):
        raise errors.UsageError(f'{where} has "thinking" that is not text ({thinking!r})')
    cut = msg.get("cut", False)
    if not isinstance(cut, bool):
        raise errors.UsageError(f'{where} has "cut" that is not true or false ({cut!r})')
    return Turn(question, content, thinking=thinking, mode=mode, cut=cut)


def _cleaned(found: Transcript) -> Transcript:
    """`found` with every text through `text.clean`, and how many code points it replaced."""
    count = 0

    def clean(value: str) -> str:
        nonlocal count
        cleaned, n = text.clean(value)
        count += n
        return cleaned

    turns = [
        replace(t, user=clean(t.user), answer=clean(t.answer), thinking=clean(t.thinking))
        for t in found.turns
    ]
    system = clean(found.system) if found.system else found.system
    return replace(found, system=system, turns=turns, replaced=count)


def read_transcript(path: Path) -> Transcript:
    """A transcript file, checked whole; a one-line UsageError says what is wrong where."""
    return _cleaned(_parse(_read_document(path), path))
