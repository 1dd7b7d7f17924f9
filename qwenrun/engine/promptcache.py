"""The prompt cache on disk: evaluated prompts kept across processes, never trusted blindly.

Contract: a `PromptCache` is a folder (`<qwenrun home>/prompt-cache/`) of entry files, each
the state of one evaluated prompt of at least MIN_TOKENS tokens: llama.cpp's full sequence
state after the whole prompt (attention KV and recurrent state), plus, for hybrid models,
the partial checkpoints taken inside it (`checkpoints.py`), so a later prompt that shares
only part of it can still start from the last checkpoint before it diverges. This module
reads and writes the files and checks them; the engine decides what to save and loads the
bytes into llama.cpp.

An entry file is: the magic `QWRNPC01`, a little-endian u32 header length, a JSON header, the
prompt's tokens (int32 little-endian), then the sections the header lists (the full state,
then the partial ones), each with its length and sha256. The header's `key` says what the
bytes mean: the model file (size and a hash of its first and last MiB, every shard), the
llama.cpp build (llama-cpp-python's version, the library's size and mtime, the CPU features
it runs with), and the context settings that change the state's layout or numbers (KV type,
flash attention as requested, GPU or CPU). llama.cpp itself accepts a state of other weights
with the same shapes, or with a flipped byte, silently; so a file whose key, lengths or
checksums do not match is treated as foreign or damaged: ignored, and removed. Only regular
files of the folder itself are entries: a FIFO (whose open would wait forever), a device or a
symbolic link (which may point out of the folder) is passed over unopened and left alone.

File names are `<key hash>-<hash of the first BUCKET_TOKENS tokens>-<hash of all tokens>.qwrc`,
so a lookup reads only the headers of entries of this model and settings that begin like the
prompt. Writes go to a temporary file in the same folder, fsynced, then renamed into place
(a reader never sees half a file), on a background thread the engine joins when it closes.
Using an entry touches its mtime; after each write the oldest entries (by mtime, every key)
are removed until the folder is under the cap. The cap comes from `--prompt-cache SIZE`, else
`QWENRUN_PROMPT_CACHE` (a size, or 0/off), else DEFAULT_CAP; 0 disables the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import struct
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qwenrun import config, errors, units
from qwenrun.atomic import write_atomic
from qwenrun.hub import names

MAGIC = b"QWRNPC01"
FORMAT = 1
SUFFIX = ".qwrc"
ENV = "QWENRUN_PROMPT_CACHE"
DEFAULT_CAP = 4 * units.GIB

# A prompt is saved once it is this long and at least this many of its tokens are not in an
# entry already: below that, evaluating is quick and an entry (tens of MiB for a real model)
# would mostly churn the cache. The cache is looked up when this many tokens would otherwise
# be evaluated.
MIN_TOKENS = 1024
# Entries that share fewer tokens than this with a prompt are not worth loading; it is also the
# length of the token prefix hashed into the file name (the bucket a lookup reads).
BUCKET_TOKENS = 256

_HEADER_MAX = 1 << 20
_TOKENS_MAX = 1 << 24
_STALE_TMP_S = 3600.0
_MIB = 1 << 20


# --------------------------------------------------------------------------------------
# The cap


def parse_cap(text: str, source: str) -> int:
    """Bytes from what a user writes for the cap: `4GiB`, `512M`, a bare number (GiB), or
    `0`/`off` (none). `source` names the flag or variable in the error."""
    value = text.strip().lower()
    if value in ("off", "no", "none", "false", "disable", "disabled"):
        return 0
    if value in ("on", "yes", "true", "default"):
        return DEFAULT_CAP
    try:
        return units.parse_size(value, source)
    except errors.UsageError:
        raise errors.UsageError(
            f"cannot read {source} {text!r}",
            hint="give a size such as 4GiB or 512M, or 0 (or off) to turn the cache off",
        ) from None


def cap_from_env() -> int:
    """The cap from QWENRUN_PROMPT_CACHE, or DEFAULT_CAP when it is not set."""
    text = os.environ.get(ENV, "").strip()
    return parse_cap(text, ENV) if text else DEFAULT_CAP


def folder() -> Path:
    return config.qwenrun_home() / "prompt-cache"


# --------------------------------------------------------------------------------------
# What the bytes mean


def model_identity(path: Path) -> str:
    """The model file(s) by content: size plus a hash of the first and last MiB of each
    shard (the header and metadata; tensor data that differs with the weights). Cheap, and
    independent of the path, so a copied or re-linked file still matches."""
    h = hashlib.sha256()
    for shard in names.local_shards(path):
        size = shard.stat().st_size
        h.update(f"{size};".encode())
        with shard.open("rb") as f:
            h.update(f.read(_MIB))
            if size > 2 * _MIB:
                f.seek(size - _MIB)
                h.update(f.read(_MIB))
    return h.hexdigest()


def build_identity(lc: Any) -> str:
    """The llama.cpp build: the state's byte layout follows its memory code, which has no
    version of its own; the CPU features it runs with change the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("llama-cpp-python")
    except PackageNotFoundError:
        package = "?"
    lib = getattr(getattr(lc, "_lib", None), "_name", None)
    stamp = "?"
    if lib:
        with contextlib.suppress(OSError):
            st = os.stat(lib)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
    info = lc.llama_print_system_info().decode("utf-8", "replace").strip()
    return f"llama-cpp-python {package}; lib {stamp}; {info}"


def key_for(
    model: str, build: str, *, kv_type: str, flash_attn: str, on_gpu: bool
) -> dict[str, Any]:
    """Everything that must match for an entry's bytes to mean the same here."""
    return {
        "model": model,
        "build": build,
        "kv_type": kv_type.lower(),
        "flash_attn": flash_attn,
        "n_seq_max": 1,
        "backend": "gpu" if on_gpu else "cpu",
    }


def _digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("i", tokens)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def _tokens_from(data: bytes) -> list[int]:
    arr = array("i")
    arr.frombytes(data)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


# --------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class Section:
    """One state in an entry: "full" (the whole sequence) or "partial" (a checkpoint)."""

    kind: str
    n_tokens: int
    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class Entry:
    """An entry file whose header, length and tokens checked out."""

    path: Path
    tokens: list[int]
    full: Section
    partials: tuple[Section, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class Snapshot:
    """What the engine hands over to be written: the tokens and the states, as bytes that
    nothing changes any more."""

    tokens: list[int]
    full: bytearray
    partials: list[tuple[int, bytearray]] = field(default_factory=list)


@dataclass(frozen=True)
class DiskReport:
    folder: Path
    cap: int
    entries: int
    bytes: int
    loaded_tokens: int
    saved: int
    removed_bad: int


class _Bad(Exception):
    """An entry file that is not what its header says: foreign, truncated or damaged."""


def _open_regular(path: Path) -> io.BufferedReader | None:
    """`path` opened for reading when it is a regular file of the folder itself; None for
    anything else, unopened: a FIFO would block the open until a writer came (forever), a
    device or socket is no entry, and a symbolic link may point out of the folder. Asked of
    the name first (lstat), then of what was opened (no links followed, no waiting, fstat),
    so a file swapped in between does not slip through."""
    if not stat.S_ISREG(path.lstat().st_mode):
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check(ok: bool) -> None:
    if not ok:
        raise _Bad


def _parse_entry(path: Path, f: BinaryIO, size: int, key: dict[str, Any]) -> Entry:
    head = f.read(len(MAGIC) + 4)
    _check(len(head) == len(MAGIC) + 4 and head[: len(MAGIC)] == MAGIC)
    (header_len,) = struct.unpack("<I", head[len(MAGIC) :])
    _check(header_len <= _HEADER_MAX)
    header = json.loads(f.read(header_len))
    n = header["n_tokens"]
    _check(header.get("format") == FORMAT and header.get("key") == key)
    _check(isinstance(n, int) and BUCKET_TOKENS <= n <= _TOKENS_MAX)
    raw = f.read(4 * n)
    _check(len(raw) == 4 * n and _digest(raw) == header["tokens_sha256"])
    offset = len(MAGIC) + 4 + header_len + 4 * n
    sections = []
    for s in header["sections"]:
        sec = Section(str(s["kind"]), int(s["n_tokens"]), offset, int(s["length"]), s["sha256"])
        _check(sec.length > 0 and 0 < sec.n_tokens <= n and isinstance(sec.sha256, str))
        sections.append(sec)
        offset += sec.length
    # Exactly the bytes the header promises: a truncated (or extended) file stops here.
    _check(offset == size and bool(sections))
    full, partials = sections[0], tuple(sections[1:])
    _check(full.kind == "full" and full.n_tokens == n)
    _check(all(p.kind == "partial" and p.n_tokens < n for p in partials))
    return Entry(path, _tokens_from(raw), full, partials)


class PromptCache:
    """Entries for one model and one set of settings (`key`), in one folder with one cap."""

    def __init__(self, root: Path, cap: int, key: dict[str, Any]) -> None:
        self.root = root
        self.cap = cap
        self.key = key
        self.key_hash = _digest(json.dumps(key, sort_keys=True).encode())[:16]
        self.loaded_tokens = 0  # prompt tokens loaded from entries instead of evaluated
        self.saved = 0
        self.removed_bad = 0
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- lookup

    def candidates(self, prompt: Sequence[int]) -> list[Entry]:
        """Checked entries of this key whose first BUCKET_TOKENS tokens are the prompt's."""
        if len(prompt) < BUCKET_TOKENS:
            return []
        bucket = _digest(_token_bytes(prompt[:BUCKET_TOKENS]))[:16]
        try:
            paths = sorted(self.root.glob(f"{self.key_hash}-{bucket}-*{SUFFIX}"))
        except OSError:
            return []
        out = []
        for path in paths:
            entry = self._read_entry(path)
            if entry is not None:
                out.append(entry)
        return out

    def _read_entry(self, path: Path) -> Entry | None:
        """The header and tokens of an entry; a file that fails any check is removed; what is
        no regular file of this folder (a FIFO, a link) is passed over and left alone."""
        try:
            f = _open_regular(path)
            if f is None:
                return None
            with f:
                return _parse_entry(path, f, os.fstat(f.fileno()).st_size, self.key)
        except FileNotFoundError:
            return None  # evicted by another process meanwhile
        except (_Bad, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
            self._bad(path)
            return None

    def read(self, entry: Entry, section: Section) -> bytearray | None:
        """A section's bytes, checked against its sha256 (a damaged entry is removed)."""
        try:
            f = _open_regular(entry.path)
            if f is None:
                return None  # replaced by something else since it was read: not ours
            with f:
                f.seek(section.offset)
                data = bytearray(section.length)
                got = f.readinto(data)
        except OSError:
            self.discard(entry)
            return None
        if got != section.length or _digest(data) != section.sha256:
            self.discard(entry)
            return None
        return data

    def used(self, entry: Entry, n_tokens: int) -> None:
        """An entry was loaded: it is now the most recently used."""
        self.loaded_tokens += n_tokens
        with contextlib.suppress(OSError):
            os.utime(entry.path)

    def discard(self, entry: Entry) -> None:
        """An entry that llama.cpp or a check refused: never offered again."""
        self._bad(entry.path)

    def _bad(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()
            self.removed_bad += 1

    # ---- saving

    def would_keep(self, n_bytes: int) -> bool:
        """Whether an entry of about this size is written at all: an entry bigger than half
        the cap would push out everything else for one prompt."""
        return 0 < n_bytes <= self.cap // 2

    def save_async(self, snap: Snapshot) -> None:
        """Write an entry on a background thread (one at a time, in order)."""
        self.wait()
        thread = threading.Thread(
            target=self._write_quietly, args=(snap,), name="qwenrun-prompt-cache", daemon=False
        )
        self._writer = thread
        thread.start()

    def wait(self) -> None:
        """Let a pending write finish (the engine calls this before it closes)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _write_quietly(self, snap: Snapshot) -> None:
        # The cache only saves time: whatever goes wrong in a write (a full disk, a read-only
        # home, memory) costs that entry, never a traceback in the middle of an answer.
        with contextlib.suppress(Exception):
            self._write(snap)

    def _write(self, snap: Snapshot) -> None:
        tokens = _token_bytes(snap.tokens)
        blobs: list[tuple[str, int, bytearray]] = [("full", len(snap.tokens), snap.full)]
        blobs += [("partial", n, data) for n, data in snap.partials if n < len(snap.tokens)]
        if not self.would_keep(len(tokens) + sum(len(b) for _, _, b in blobs)):
            return
        header = {
            "format": FORMAT,
            "key": self.key,
            "n_tokens": len(snap.tokens),
            "tokens_sha256": _digest(tokens),
            "sections": [
                {"kind": k, "n_tokens": n, "length": len(b), "sha256": _digest(b)}
                for k, n, b in blobs
            ],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        head = json.dumps(header, sort_keys=True).encode()
        bucket = _digest(_token_bytes(snap.tokens[:BUCKET_TOKENS]))[:16]
        name = f"{self.key_hash}-{bucket}-{_digest(tokens)[:16]}{SUFFIX}"
        first = MAGIC + struct.pack("<I", len(head)) + head + tokens
        chunks: list[bytes | bytearray] = [first, *(b for _, _, b in blobs)]
        try:
            write_atomic(self.root / name, chunks, durable=True)
        except OSError:
            return  # a full disk or a read-only home: no entry, and the answer goes on
        with self._lock:
            self.saved += 1
        self.evict()

    def evict(self) -> None:
        """Remove the least recently used entries (any key) until the folder fits the cap;
        also temporary files a killed writer left behind."""
        files: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            listing = list(self.root.iterdir())
        except OSError:
            return
        for path in listing:
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # a link, a FIFO, a folder: not an entry, and not ours to remove
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > _STALE_TMP_S:
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            if path.suffix == SUFFIX:
                files.append((st.st_mtime, st.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.cap:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size

    # ---- what it holds

    def report(self) -> DiskReport:
        entries, used = 0, 0
        with contextlib.suppress(OSError):
            for path in self.root.glob(f"*{SUFFIX}"):
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    if stat.S_ISREG(st.st_mode):
                        used += st.st_size
                        entries += 1
        return DiskReport(
            self.root, self.cap, entries, used, self.loaded_tokens, self.saved, self.removed_bad
        )
