"""Moving one file's bytes from the hub to the cache: resume, retries, progress, disk check.

Contract: `download` brings a blob's `.incomplete` file to its full size, resuming from the
bytes already there with an HTTP Range request; a dropped connection, a 5xx or 429, or an
expired storage URL is retried with backoff (`RetryPolicy`), and every byte received is
kept, on Ctrl-C too. Bytes go to the caller's `Hasher` as they are written. The token goes
only to the hub's own origin, never to the storage a download is redirected to.
`check_disk` refuses before the first byte when the bytes still missing exceed the free
space; `disk_full` words a write that fails anyway (ENOSPC, EDQUOT, EFBIG) as one
`DiskSpaceError` saying what is on disk and what is missing (the partial file is kept, so the
same command resumes). Progress for the whole quant goes to the caller's callback through
`Meter`, at most every 0.1 s, and only for real work (bytes moving or a file being hashed):
a file already present and verified reports nothing. It decides nothing about the cache's
layout (`cache`) or which files to fetch (`listing`).
"""

from __future__ import annotations

import errno
import io
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.utils import get_session, hf_raise_for_status

from qwenrun import errors, units
from qwenrun.hub.listing import HubFile, PullTarget
from qwenrun.hub.session import (
    HubUnreachableError,
    auth_error,
    hub_endpoint,
    hub_errors,
    hub_headers,
    same_origin,
)
from qwenrun.hub.verify import CHUNK, Expected, Hasher

_PROGRESS_EVERY_S = 0.1


# ------------------------------------------------------------------------------ progress


@dataclass(frozen=True)
class PullProgress:
    """Where a pull stands, for the whole quant."""

    reference: str
    file_index: int  # 1-based
    n_files: int
    file: str
    done_bytes: int
    total_bytes: int
    phase: Literal["download", "verify"]


ProgressFn = Callable[[PullProgress], None]


class Meter:
    """Counts bytes for the whole quant and calls back at most every 0.1 s (and at the end).

    Only files with work to do are reported (`start_file`): a quant already complete and
    verified makes no call at all, so nothing shows a bar for bytes that never move.
    """

    def __init__(self, target: PullTarget, on_progress: ProgressFn | None) -> None:
        self.target = target
        self.on_progress = on_progress
        self.done = 0
        self.base = 0  # bytes of the files before the current one
        self.index = 0
        self.file = ""
        self.phase: Literal["download", "verify"] = "download"
        self.working = False  # a file was downloaded or hashed: the end is worth reporting
        self._last = 0.0

    def start_file(self, index: int, f: HubFile, phase: Literal["download", "verify"]) -> None:
        """Real work on file `index` begins: bytes to download, or a file to hash."""
        self.index, self.file, self.phase = index, f.path, phase
        self.base = sum(x.size for x in self.target.quant.files[: index - 1])
        self.working = True
        self.set(0, force=True)

    def finish(self) -> None:
        """The whole quant is there: a last report, if anything was reported before."""
        if self.working:
            self.base = 0
            self.set(self.target.total_size, force=True)

    def set(self, file_bytes: int, *, force: bool = False) -> None:
        self.done = self.base + file_bytes
        now = time.monotonic()
        if self.on_progress is None or not self.working:
            return
        if not force and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        self.on_progress(
            PullProgress(
                reference=self.target.reference,
                file_index=self.index,
                n_files=len(self.target.quant.files),
                file=self.file,
                done_bytes=self.done,
                total_bytes=self.target.total_size,
                phase=self.phase,
            )
        )


# ------------------------------------------------------------------------------ fetching


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` failures in a row that brought no new byte end a pull."""

    attempts: int = 5
    base_wait_s: float = 1.0
    max_wait_s: float = 30.0

    def wait(self, failures: int) -> float:
        return float(min(self.max_wait_s, self.base_wait_s * 2 ** max(failures - 1, 0)))


@dataclass(frozen=True)
class FileMeta:
    etag: str  # the blob's name in the cache
    location: str  # where the bytes are (the hub, or its storage via a signed URL)
    size: int


class _Transient(Exception):
    """A failure worth retrying (dropped connection, 5xx, 429, expired storage URL)."""


class _RangeRefused(_Transient):
    """The server refused our Range (416): the partial bytes are dropped before retrying."""


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
DEFAULT_RETRY = RetryPolicy()


def file_meta(target: PullTarget, f: HubFile) -> FileMeta:
    url = hf_hub_url(target.repo, f.path, revision=target.revision, endpoint=hub_endpoint())
    with hub_errors(target.repo, f"reading {f.path}'s headers"):
        meta = get_hf_file_metadata(url, headers=hub_headers(), endpoint=hub_endpoint())
    etag = meta.etag or f.sha256 or ""
    if not etag or etag != etag.strip("/\\.") or "/" in etag or "\\" in etag:
        raise errors.DownloadError(
            f"the hub sent no usable ETag for {f.path} in {target.repo}",
            hint="check HF_ENDPOINT: it must point at a Hugging Face hub",
        )
    size = meta.size if meta.size is not None else f.size
    if size != f.size:
        raise errors.DownloadError(
            f"the hub lists {f.path} as {f.size:,} bytes but serves {size:,}",
            hint="run the pull again later; the repo may be in the middle of an update",
        )
    return FileMeta(etag=etag, location=meta.location, size=size)


def missing_bytes(target: PullTarget, metas: Sequence[FileMeta], storage: Path) -> int:
    """Bytes still to download: whole files, less the blobs present and partial bytes kept."""
    missing = 0
    for meta in metas:
        blob = storage / "blobs" / meta.etag
        if blob.exists():
            continue
        partial = blob.with_name(meta.etag + ".incomplete")
        have = partial.stat().st_size if partial.exists() else 0
        missing += max(meta.size - have, 0) if have <= meta.size else meta.size
    return missing


def _free_bytes(path: Path) -> tuple[int, Path]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def check_disk(target: PullTarget, metas: Sequence[FileMeta], storage: Path) -> None:
    """Refuse, before any byte, when the bytes still missing exceed the free disk."""
    missing = missing_bytes(target, metas, storage)
    free, where = _free_bytes(storage)
    if missing > free:
        raise errors.DiskSpaceError(
            f"not enough disk space for {target.reference}: {units.gb(missing)} still to "
            f"download, {units.gb(free)} free on {where}",
            hint="free some space, or set HF_HUB_CACHE to a folder on a larger disk",
        )


# Writes that fail because the disk (or the user's share of it, or the largest file it or a
# `ulimit -f` allows) has no room left: the same situation for the user, worded by cause.
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file system refused a file this large",
}


def disk_full(
    err: OSError, target: PullTarget, metas: Sequence[FileMeta], storage: Path
) -> errors.DiskSpaceError | None:
    """A failed write in words: what is on disk, what is missing, what to do; None for an
    OSError that is not about room. The partial file is kept: the same command resumes."""
    cause = _NO_ROOM.get(err.errno or 0)
    if cause is None:
        return None
    missing = missing_bytes(target, metas, storage)
    have = max(target.total_size - missing, 0)
    # The file that found no room names its disk (a note in QWENRUN_HOME may be elsewhere);
    # a write to an open file names none: then it is the cache's.
    free, where = _free_bytes(Path(err.filename) if isinstance(err.filename, str) else storage)
    if err.errno == errno.EFBIG:
        hint = (
            "set HF_HUB_CACHE to a folder on a file system that takes large files "
            "(or raise `ulimit -f`), then run the same command: it resumes from there"
        )
    else:
        hint = (
            f"free at least {units.gb(missing)} on {where} ({units.gb(free)} free now), "
            "or set HF_HUB_CACHE to a larger disk, then run the same command: "
            "it resumes from there"
        )
    return errors.DiskSpaceError(
        f"{cause} while downloading {target.reference}: {units.gb(have)} of "
        f"{units.gb(target.total_size)} on disk, {units.gb(missing)} still missing",
        hint=hint,
    )


def download(
    target: PullTarget,
    f: HubFile,
    meta: FileMeta,
    partial: Path,
    expected: Expected | None,
    meter: Meter,
    retry: RetryPolicy,
) -> str | None:
    """Bring `partial` to the full size, resuming from its bytes; returns the digest."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > meta.size:  # not this file's bytes: start over
        partial.write_bytes(b"")
        have = 0
    hasher = Hasher(expected) if expected is not None else None
    try:
        if hasher is not None:
            hasher.feed_file(partial, have)
        meter.set(have, force=True)
        _download_with_retries(target, f, meta, partial, hasher, meter, retry)
    finally:
        digest = hasher.finish() if hasher is not None else None
    return digest


def _download_with_retries(
    target: PullTarget,
    f: HubFile,
    meta: FileMeta,
    partial: Path,
    hasher: Hasher | None,
    meter: Meter,
    retry: RetryPolicy,
) -> None:
    failures = 0
    location = meta.location
    while True:
        before = _size(partial)
        if before >= meta.size:
            return
        reason: Exception | None = None
        try:
            _stream_once(target, location, partial, meta.size, hasher, meter)
        except _Transient as err:
            reason = err
        gained = _size(partial) - before
        failures = 0 if gained > 0 else failures + 1
        if reason is None and gained > 0:
            continue
        if failures >= retry.attempts:
            raise errors.DownloadError(
                f"downloading {f.path} failed {failures} times in a row "
                f"({reason or 'the server sent no bytes'}); "
                f"{units.gb(_size(partial))} of {units.gb(meta.size)} kept",
                hint="run the same pull again: it resumes from there",
            ) from reason
        time.sleep(retry.wait(max(failures, 1)))
        location = _fresh_location(target, f, location)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fresh_location(target: PullTarget, f: HubFile, old: str) -> str:
    """A storage URL is signed for a limited time: ask the hub again before retrying."""
    try:
        return file_meta(target, f).location
    except HubUnreachableError:
        return old  # still no network: the next attempt fails (and counts) on its own


def _stream_once(
    target: PullTarget,
    location: str,
    partial: Path,
    size: int,
    hasher: Hasher | None,
    meter: Meter,
) -> None:
    """One GET from the current size of `partial` to the end; keeps every byte received."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = hub_headers()
    if not same_origin(location, hub_endpoint()):
        headers.pop("authorization", None)  # the token stays with the hub, never its storage
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with get_session().stream("GET", location, headers=headers, timeout=_timeout()) as r:
            _check_status(target, r, have, size)
            if have and r.status_code == 200:
                # The server ignored the Range: what it sends starts at byte 0.
                partial.write_bytes(b"")
                if hasher is not None:
                    hasher.reset()
                have = 0
            _write_body(r, partial, have, size, hasher, meter)
    except httpx2.TransportError as err:
        raise _Transient(_describe(err)) from err
    except _RangeRefused:
        partial.write_bytes(b"")
        if hasher is not None:
            hasher.reset()
        raise


def _describe(err: httpx2.TransportError) -> str:
    if isinstance(err, httpx2.TimeoutException):
        return "timed out"
    if isinstance(err, httpx2.ConnectError):
        return "could not connect"
    return "connection dropped"


def _timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _check_status(target: PullTarget, r: httpx2.Response, have: int, size: int) -> None:
    status = r.status_code
    if status in (200, 206):
        return
    if status in _RETRY_STATUS:
        raise _Transient(f"HTTP {status}")
    if status in (401, 403) and same_origin(str(r.url), hub_endpoint()):
        raise auth_error(target.repo, status)
    if status in (401, 403):
        raise _Transient(f"storage answered HTTP {status}; asking the hub for a fresh URL")
    if status == 416:
        # The partial file is longer than what the server has: it cannot be resumed.
        partial_reset = f"HTTP 416 at byte {have:,} of {size:,}; starting the file over"
        raise _RangeRefused(partial_reset)
    r.read()
    with hub_errors(target.repo, "downloading"):
        hf_raise_for_status(r)


def _write_body(
    r: httpx2.Response,
    partial: Path,
    have: int,
    size: int,
    hasher: Hasher | None,
    meter: Meter,
) -> None:
    """Append the body to `partial` in large chunks; on any error, what arrived is written."""
    pieces: list[bytes] = []
    pending = 0
    with partial.open("ab", buffering=0) as out:

        def flush() -> None:
            nonlocal have, pending
            if not pieces:
                return
            data = b"".join(pieces)  # one copy; the same bytes go to the file and the hash
            pieces.clear()
            pending = 0
            _write_all(out, data)
            if hasher is not None:
                hasher.feed(data)
            have += len(data)
            meter.set(have)

        try:
            for piece in r.iter_raw():
                pieces.append(piece)
                pending += len(piece)
                if pending >= CHUNK:
                    flush()
                    if have > size:
                        raise errors.DownloadError(
                            f"the hub sent more than the {size:,} bytes it listed",
                            hint="run the pull again later",
                        )
        finally:
            flush()  # also on Ctrl-C or a dropped connection: those bytes are kept


def _write_all(out: io.FileIO, data: bytes) -> None:
    """Write every byte: an unbuffered write may take only part (a disk filling up takes
    what fits, then fails), and a byte silently left out would leave a gap in the file."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]
