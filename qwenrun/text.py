"""Text that enters qwenrun: what happens to what is not valid Unicode, decided once.

Contract: every place where outside text becomes a prompt, a message or a setting (stdin,
command-line arguments, files such as transcripts, the REPL's line, HTTP request bodies)
passes it through `clean`. Python hands such text over with the bytes that were not UTF-8
as lone surrogates (stdin and arguments decode with `surrogateescape`; JSON's `"\\ud800"`
escapes decode to one), which llama.cpp's tokenizer cannot take. The rule: each such code
point becomes U+FFFD (the replacement character �), the text is otherwise kept as it is, and
the caller is told how many were replaced, so it can say so once (a notice on stderr, the
server's log line). Refusing instead would lose a whole piped document to one stray byte of
Latin-1; replacing is what editors and terminals do with the same bytes. Pure.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(text: str) -> tuple[str, int]:
    """`text` with every lone surrogate replaced by U+FFFD, and how many were replaced."""
    if text.isascii():
        return text, 0  # the common case, without a scan
    return _SURROGATE.subn(REPLACEMENT, text)


def notice(replaced: int, where: str) -> str:
    """The one line that says so, e.g. `note: 2 bytes of the prompt were not UTF-8 (each is
    now �)`."""
    what = "byte" if replaced == 1 else "bytes"
    verb = "was" if replaced == 1 else "were"
    return f"note: {replaced} {what} of {where} {verb} not UTF-8 (each is now {REPLACEMENT})"
