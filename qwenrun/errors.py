"""The error types qwenrun raises for things a user can fix.

Contract: every `QwenrunError` carries a one-line `message` (what went wrong) and an optional
`hint` (what to do about it). Nothing here prints or exits; `cli.py` turns each type into a
message and an exit code through one table. Code that cannot go on because of bad input,
a missing file or a machine that is too small raises one of these; anything else is a bug
and is allowed to surface as a traceback under `QWENRUN_DEBUG=1`.
"""

from __future__ import annotations


class QwenrunError(Exception):
    """Base class: a problem the user can act on."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QwenrunError):
    """An option or argument that cannot work (bad value, conflicting flags)."""


class Declined(QwenrunError):
    """The user answered no to a question (a download): a choice, not an error.

    `cli` prints the message alone, without "error:", and exits 1 (as `rm -i` answered no).
    """


class ModelNotFoundError(QwenrunError):
    """A model reference that names no file, catalog entry or hub quant."""


class InvalidModelError(QwenrunError):
    """A file that exists but is not a usable GGUF (wrong magic, truncated, corrupt)."""


class UnsupportedModelError(QwenrunError):
    """A valid GGUF whose architecture this llama.cpp build cannot run."""


class ContextOverflowError(QwenrunError):
    """A prompt that does not fit in the context window."""


class DoesNotFitError(QwenrunError):
    """No plan fits the machine's memory; the message says what the smallest option needs.

    `need_bytes` and `have_bytes` carry the two numbers behind it when the planner knows them
    (for tables); `alternatives` the nearest changes that do fit.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        alternatives: tuple[str, ...] = (),
        *,
        need_bytes: int | None = None,
        have_bytes: int | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.alternatives = alternatives
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes


class BackendError(QwenrunError):
    """llama.cpp refused to load or run the model (out of memory, decode failure)."""


class OutOfMemoryError(BackendError):
    """A buffer did not fit in RAM or VRAM while loading or creating the context."""


class WorkerError(QwenrunError):
    """An RPC worker (`qwenrun worker`) that cannot be used: unreachable, busy with another
    client, speaking another RPC protocol version, or a llama.cpp build without RPC."""


class OutputError(QwenrunError):
    """Standard output cannot be written: a full disk (`> /dev/full`), a closed stdout (`>&-`).

    A reader that went away (`| head -c 1`) is not one: that ends quietly.
    """


class DownloadError(QwenrunError):
    """The hub could not deliver a file (network, server error, cut connection)."""


class AuthError(DownloadError):
    """The hub answered 401/403: a gated or private repo needs HF_TOKEN."""


class IntegrityError(DownloadError):
    """A downloaded file's sha256 differs from the hub's LFS hash."""


class DiskSpaceError(DownloadError):
    """Not enough free disk for the bytes still to download."""


class OfflineError(DownloadError):
    """Offline mode (HF_HUB_OFFLINE) and the files are not in the cache."""
