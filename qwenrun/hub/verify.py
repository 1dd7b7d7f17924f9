"""Checking a file's bytes against what the hub says they hash to.

Contract: the digest a file must have (`Expected`: the LFS sha256, or git's blob sha1 for a
file kept in git) and two ways to compute it: `Hasher`, fed the bytes as they download, in
a thread of its own (hashlib releases the GIL, so checking costs no download time), and
`hash_file` for a file already on disk. It decides nothing about what to do on a mismatch
beyond wording the error (`mismatch`); `pull` deletes and records.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwenrun import errors
from qwenrun.hub.listing import HubFile, PullTarget

CHUNK = 4 << 20  # bytes written and hashed at a time
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Expected:
    """The digest a file must have: the LFS sha256, or git's blob sha1 for files kept in git."""

    algo: Literal["sha256", "sha1"]
    digest: str
    size: int

    @property
    def prefix(self) -> bytes:
        # git hashes "blob <size>\0" + content
        return f"blob {self.size}\0".encode() if self.algo == "sha1" else b""

    @property
    def label(self) -> str:
        return "sha256" if self.algo == "sha256" else "git sha1"


class Hasher:
    """Hashes in a thread (hashlib releases the GIL), so checking costs no download time."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self._h = self._fresh()
        self._q: queue.Queue[object] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True, name="qwenrun-sha")
        self._thread.start()

    def _fresh(self) -> hashlib._Hash:
        h = hashlib.new(self.expected.algo)
        h.update(self.expected.prefix)
        return h

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if item == "reset":
                self._h = self._fresh()
            elif isinstance(item, tuple):
                path, n = item
                self._hash_file(path, n)
            else:
                assert isinstance(item, bytes)
                self._h.update(item)

    def _hash_file(self, path: Path, n: int) -> None:
        with path.open("rb") as f:
            while n > 0:
                chunk = f.read(min(CHUNK, n))
                if not chunk:
                    return
                self._h.update(chunk)
                n -= len(chunk)

    def feed(self, data: bytes) -> None:
        self._q.put(data)

    def feed_file(self, path: Path, n: int) -> None:
        """Hash the first `n` bytes already on disk (the part a resumed download kept)."""
        if n:
            self._q.put((path, n))

    def reset(self) -> None:
        self._q.put("reset")

    def finish(self) -> str:
        self._q.put(None)
        self._thread.join()
        return self._h.hexdigest()


def expected_for(f: HubFile, etag: str | None = None) -> Expected | None:
    if f.sha256:
        return Expected("sha256", f.sha256.lower(), f.size)
    if etag and SHA256_RE.match(etag):
        return Expected("sha256", etag, f.size)
    if f.blob_id:
        return Expected("sha1", f.blob_id.lower(), f.size)
    return None


def hash_file(path: Path, expected: Expected, on_bytes: Callable[[int], None]) -> str:
    """Hash a file on disk (for blobs that some other tool downloaded)."""
    h = hashlib.new(expected.algo)
    h.update(expected.prefix)
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            on_bytes(done)
    return h.hexdigest()


def mismatch(
    target: PullTarget, f: HubFile, expected: Expected, got: str, fate: str
) -> errors.IntegrityError:
    return errors.IntegrityError(
        f"{f.path} from {target.repo} failed its {expected.label} check "
        f"(the hub lists {expected.digest[:16]}…, the bytes give {got[:16]}…); {fate}",
        hint="run the pull again; if it fails the same way, the hub's copy is damaged: "
        "try another repo or quant",
    )
