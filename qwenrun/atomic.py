"""Files written whole or not at all: the one atomic write of qwenrun.

Contract: `write_atomic(path, data)` writes `data` (text, bytes, or chunks of bytes) into a
temporary file beside `path` (same folder, so the same file system), then renames it over
`path`: a reader sees the old content or the new, never half of either, and a crash leaves at
worst a hidden `.NAME.PID.THREAD.tmp` that nothing reads. The folder is created when missing.
`durable=True` also flushes the data to the disk before the rename (what a transcript or a
prompt-cache entry needs to survive a power cut); `mode` sets the new file's permissions
(without it they are a new file's, even over an old one: `transcript` passes the old file's mode
to keep it). On any failure (an `OSError`, or an interrupt) the temporary file is removed and
the error raised: callers for whom a note that cannot be kept is no failure suppress it
themselves.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path


def write_atomic(
    path: Path,
    data: str | bytes | Iterable[bytes | bytearray],
    *,
    durable: bool = False,
    mode: int | None = None,
) -> None:
    """Replace `path` with `data` in one step (see the module docstring)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    chunks: Iterable[bytes | bytearray]
    if isinstance(data, str):
        chunks = (data.encode("utf-8"),)
    elif isinstance(data, bytes):
        chunks = (data,)
    else:
        chunks = data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
