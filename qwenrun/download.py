"""Hub access: list a repo's quants, pull one quant into the HF cache, verified and resumable.

Contract: everything here goes through huggingface_hub for what it does well — endpoint and
URLs (`hf_hub_url`), auth headers and `HF_TOKEN` (`build_hf_headers`), file metadata
(`model_info`, `get_hf_file_metadata`), its shared HTTP session, cache scanning and deletion —
and adds what huggingface_hub 2.x does not do: resume across runs from the partial bytes
(`blobs/<etag>.incomplete` plus `Range: bytes=N-`; the library deletes its own temporary file
on failure), retries with backoff that keep every byte received, a disk-space refusal before
the first byte, and a streamed sha256 check against the hub's LFS hash, recorded so a file is
hashed once. Files land in the standard cache layout (`blobs/`, `snapshots/<commit>/<path>`
symlinks, `refs/<branch>`), so other tools find them and `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`,
`HF_HUB_OFFLINE` and `HF_ENDPOINT` mean what users expect; all of them are read at call time.

Every file is fetched over plain HTTP from the `resolve` URL, Xet-backed ones included: the hub
redirects those to its Xet bridge, which serves the same bytes with Range support, so resume
and verification work the same (hf_xet's chunked transfer is not used). The token is sent only
to the hub's own origin and never appears in a message. Nothing here prints: progress goes to
the caller's callback and problems are `QwenrunError`s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import (
    WeakFileLock,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
)

from qwenrun import __version__, catalog, config, errors, modelcache
from qwenrun.refs import ModelRef, parse_ref, reference_for

DEFAULT_ENDPOINT = "https://huggingface.co"
_CHUNK = 4 << 20  # bytes written and hashed at a time
_PROGRESS_EVERY_S = 0.1
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class HubUnreachableError(errors.DownloadError):
    """The hub could not be reached at all (no network, DNS, refused): the cache may still do."""


# ------------------------------------------------------------------------------ environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """`HF_ENDPOINT`, read now (huggingface_hub itself reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """`HF_HUB_OFFLINE=1` (or transformers' `TRANSFORMERS_OFFLINE`), read now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def _token_set() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _api() -> HfApi:
    return HfApi(endpoint=hub_endpoint(), library_name="qwenrun", library_version=__version__)


def _hub_headers() -> dict[str, str]:
    headers = build_hf_headers(library_name="qwenrun", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # sizes and Range offsets are of the raw bytes
    return headers


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


# ------------------------------------------------------------------------------ errors


_AUTH_HINT = (
    "for a gated or private repo, accept its terms on the hub and set HF_TOKEN "
    "to an access token with read permission"
)


@contextlib.contextmanager
def _hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface_hub's and httpx2's exceptions into qwenrun's, with the repo named."""
    try:
        yield
    except hf_errors.OfflineModeIsEnabled as err:
        raise errors.OfflineError(
            f"offline mode is on (HF_HUB_OFFLINE) and {what} needs the hub",
            hint="unset HF_HUB_OFFLINE, or use a model that is already downloaded (qwenrun list)",
        ) from err
    except hf_errors.GatedRepoError as err:
        raise _auth_error(repo, err.response.status_code) from err
    except hf_errors.RepositoryNotFoundError as err:
        status = err.response.status_code
        if status in (401, 403):
            raise _auth_error(repo, status) from err
        raise errors.ModelNotFoundError(
            f"no repo {repo} on the hub ({hub_endpoint()})",
            hint="check the name: it is owner/repo, as on the hub's page",
        ) from err
    except hf_errors.RevisionNotFoundError as err:
        raise errors.ModelNotFoundError(f"{repo} has no such revision") from err
    except hf_errors.RemoteEntryNotFoundError as err:
        raise errors.DownloadError(
            f"{what}: the hub lists a file of {repo} that it then does not serve",
            hint="run the pull again later; the repo may be in the middle of an update",
        ) from err
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code
        if status in (401, 403):
            raise _auth_error(repo, status) from err
        raise errors.DownloadError(
            f"{what}: the hub answered HTTP {status} for {repo}",
            hint="try again later; qwenrun resumes where it stopped",
        ) from err
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as err:
        raise HubUnreachableError(
            f"cannot reach the hub at {hub_endpoint()} ({what})",
            hint="check the network connection; downloaded models still work (qwenrun list)",
        ) from err
    except httpx2.TransportError as err:
        raise errors.DownloadError(
            f"{what}: the connection to the hub failed ({type(err).__name__})",
            hint="try again; qwenrun resumes where it stopped",
        ) from err


def _auth_error(repo: str, status: int) -> errors.AuthError:
    if _token_set():
        return errors.AuthError(
            f"the hub refused access to {repo} with the token in HF_TOKEN (HTTP {status})",
            hint="check that the token is valid, has read access, and that you accepted "
            "the repo's terms on its page",
        )
    return errors.AuthError(
        f"the hub refused access to {repo} without a token (HTTP {status}): "
        "it is gated or private, or does not exist",
        hint=_AUTH_HINT,
    )


# ------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repo as the hub lists it."""

    path: str
    size: int
    sha256: str | None  # the LFS hash (None for a file kept in git)
    blob_id: str | None  # the git object id

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class QuantFiles:
    """The files of one quant: a single GGUF, or every shard of a split set in order."""

    quant: str
    files: tuple[HubFile, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)


@dataclass(frozen=True)
class RepoListing:
    """A repo at one commit: its quants (best first) and its vision projectors, kept apart."""

    repo: str
    revision: str  # the commit every file is fetched from
    quants: tuple[QuantFiles, ...]
    mmproj: tuple[HubFile, ...]

    def find(self, quant: str) -> QuantFiles | None:
        wanted = quant.lower()
        return next((q for q in self.quants if q.quant.lower() == wanted), None)

    @property
    def quant_names(self) -> tuple[str, ...]:
        return tuple(q.quant for q in self.quants)


def safe_repo_path(repo: str, path: str) -> str:
    """A repo file name that stays inside the cache folder, or DownloadError."""
    posix = path.replace("\\", "/")
    parts = posix.split("/")
    if (
        not path
        or posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise errors.DownloadError(
            f"{repo} lists a file named {path!r}, which would land outside the cache; "
            "refusing to download from this repo",
            hint="use another repo for this model; this one (or the endpoint) is not trustworthy",
        )
    return path


def list_repo(repo: str, revision: str | None = None) -> RepoListing:
    """One request for the repo's files with sizes and LFS sha256, grouped into quants."""
    with _hub_errors(repo, "listing the repo's files"):
        info = _api().model_info(repo, revision=revision, files_metadata=True)
    siblings = info.siblings or []
    files = {}
    for s in siblings:
        path = safe_repo_path(repo, s.rfilename)
        files[path] = HubFile(
            path=path,
            size=int(s.lfs.size if s.lfs else s.size or 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
    groups, mmproj = modelcache.group_files(files)
    quants = tuple(
        QuantFiles(quant=g.quant, files=tuple(files[p] for p in g.paths)) for g in groups
    )
    commit = info.sha or revision or "main"
    return RepoListing(repo, commit, quants, tuple(files[p] for p in mmproj))


def list_quants(repo: str, revision: str | None = None) -> list[QuantFiles]:
    """The repo's GGUF quants with their files, sizes and sha256, best quant first."""
    return list(list_repo(repo, revision).quants)


# ------------------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class PullTarget:
    """What a pull will fetch: one quant of one repo at one commit."""

    repo: str
    revision: str  # commit
    branch: str | None  # the ref the user asked for ("main"), written to refs/
    quant: QuantFiles
    spec: catalog.ModelSpec | None = None

    @property
    def reference(self) -> str:
        return reference_for(self.repo, self.quant.quant)

    @property
    def total_size(self) -> int:
        return self.quant.total_size


def cached_copy(target: PullTarget) -> modelcache.CachedQuant | None:
    """The complete cached copy of exactly this quant at this commit, if there is one."""
    found = modelcache.find_cached([target.repo], target.quant.quant)
    return found if found is not None and found.revision == target.revision else None


# The quants a pull picks when no quant is named and the planner cannot say (see choose_quant).
DEFAULT_QUANTS = ("UD-Q4_K_XL", "Q4_K_M")


def choose_quant(ref: ModelRef, listing: RepoListing) -> QuantFiles:
    """The quant to pull when the user names none.

    For catalog models `launch.planner_chooser` asks the planner instead; this rule serves
    repos outside the catalog: a 4-bit default when the repo has one, else the best quant
    smaller than Q4_K_M, else the smallest.
    """
    if not listing.quants:
        raise errors.ModelNotFoundError(f"{listing.repo} holds no GGUF files")
    for name in DEFAULT_QUANTS:
        found = listing.find(name)
        if found is not None:
            return found
    q4 = catalog.quant_rank("Q4_K_M")
    smaller = [q for q in listing.quants if catalog.quant_rank(q.quant) > q4]
    if smaller:
        return min(smaller, key=lambda q: catalog.quant_rank(q.quant))
    return min(listing.quants, key=lambda q: q.total_size)


Chooser = Callable[[ModelRef, RepoListing], QuantFiles]


def plan_pull(
    ref: ModelRef, quant: str | None = None, *, choose: Chooser | None = None
) -> PullTarget:
    """Find the quant to fetch: `quant` (or the ref's), else `choose`'s pick, in the ref's repos.

    A catalog model may live in several repos: the first that has the quant wins.
    """
    wanted = catalog.normalize_quant(quant) if quant else ref.quant
    listings: list[RepoListing] = []
    unusable: list[errors.QwenrunError] = []
    for repo in ref.repos:
        try:
            listing = list_repo(repo)
        except (errors.ModelNotFoundError, errors.AuthError) as err:
            # A catalog repo gone or made private (the hub answers 401 for both): try the
            # next one; with nothing usable, the first repo's error is the one to show.
            unusable.append(err)
            continue
        listings.append(listing)
        found = listing.find(wanted) if wanted else (choose or choose_quant)(ref, listing)
        if found is not None:
            return PullTarget(repo, listing.revision, "main", found, ref.spec)
    if not listings:
        raise unusable[0]
    raise _no_such_quant(ref, wanted, listings)


def _no_such_quant(
    ref: ModelRef, wanted: str | None, listings: Sequence[RepoListing]
) -> errors.ModelNotFoundError:
    import difflib

    have = sorted({q for lst in listings for q in lst.quant_names}, key=catalog.quant_rank)
    close = difflib.get_close_matches(wanted or "", have, n=3, cutoff=0.5)
    message = f"{ref.name} has no quant {wanted}"
    if close:
        message += f"; did you mean {', '.join(close)}?"
    return errors.ModelNotFoundError(
        message, hint=f"available: {', '.join(have)}" if have else "the repo has no GGUF files"
    )


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


class _Meter:
    """Counts bytes for the whole quant and calls back at most every 0.1 s (and at the end)."""

    def __init__(self, target: PullTarget, on_progress: ProgressFn | None) -> None:
        self.target = target
        self.on_progress = on_progress
        self.done = 0
        self.base = 0  # bytes of the files before the current one
        self.index = 0
        self.file = ""
        self.phase: Literal["download", "verify"] = "download"
        self._last = 0.0

    def start_file(self, index: int, f: HubFile, phase: Literal["download", "verify"]) -> None:
        self.index, self.file, self.phase = index, f.path, phase
        self.base = sum(x.size for x in self.target.quant.files[: index - 1])
        self.set(0, force=True)

    def set(self, file_bytes: int, *, force: bool = False) -> None:
        self.done = self.base + file_bytes
        now = time.monotonic()
        if self.on_progress is None or (not force and now - self._last < _PROGRESS_EVERY_S):
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


# ------------------------------------------------------------------------------ hashing


@dataclass(frozen=True)
class _Expected:
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


class _Hasher:
    """Hashes in a thread (hashlib releases the GIL), so checking costs no download time."""

    def __init__(self, expected: _Expected) -> None:
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
                chunk = f.read(min(_CHUNK, n))
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


def _expected_for(f: HubFile, etag: str | None = None) -> _Expected | None:
    if f.sha256:
        return _Expected("sha256", f.sha256.lower(), f.size)
    if etag and modelcache.SHA256_RE.match(etag):
        return _Expected("sha256", etag, f.size)
    if f.blob_id:
        return _Expected("sha1", f.blob_id.lower(), f.size)
    return None


def hash_file(path: Path, expected: _Expected, on_bytes: Callable[[int], None]) -> str:
    """Hash a file on disk (for blobs that some other tool downloaded)."""
    h = hashlib.new(expected.algo)
    h.update(expected.prefix)
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            on_bytes(done)
    return h.hexdigest()


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
class _FileMeta:
    etag: str  # the blob's name in the cache
    location: str  # where the bytes are (the hub, or its storage via a signed URL)
    size: int


class _Transient(Exception):
    """A failure worth retrying (dropped connection, 5xx, 429, expired storage URL)."""


class _RangeRefused(_Transient):
    """The server refused our Range (416): the partial bytes are dropped before retrying."""


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def _file_meta(target: PullTarget, f: HubFile) -> _FileMeta:
    url = hf_hub_url(target.repo, f.path, revision=target.revision, endpoint=hub_endpoint())
    with _hub_errors(target.repo, f"reading {f.path}'s headers"):
        meta = get_hf_file_metadata(url, headers=_hub_headers(), endpoint=hub_endpoint())
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
    return _FileMeta(etag=etag, location=meta.location, size=size)


def missing_bytes(target: PullTarget, metas: Sequence[_FileMeta], storage: Path) -> int:
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


def check_disk(target: PullTarget, metas: Sequence[_FileMeta], storage: Path) -> None:
    """Refuse, before any byte, when the bytes still missing exceed the free disk."""
    missing = missing_bytes(target, metas, storage)
    free, where = _free_bytes(storage)
    if missing > free:
        raise errors.DiskSpaceError(
            f"not enough disk space for {target.reference}: {format_bytes(missing)} still to "
            f"download, {format_bytes(free)} free on {where}",
            hint="free some space, or set HF_HUB_CACHE to a folder on a larger disk",
        )


def fetch(
    target: PullTarget,
    *,
    on_progress: ProgressFn | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> list[Path]:
    """Download and verify every file of `target` into the HF cache; the snapshot paths."""
    cache = config.hf_hub_cache()
    storage = modelcache.repo_folder(cache, target.repo)
    metas = [_file_meta(target, f) for f in target.quant.files]
    modelcache.record_pull(
        modelcache.PullRecord(
            repo=target.repo,
            revision=target.revision,
            quant=target.quant.quant,
            files=tuple(
                modelcache.PulledFile(f.path, f.size, f.sha256, m.etag)
                for f, m in zip(target.quant.files, metas, strict=True)
            ),
        )
    )
    check_disk(target, metas, storage)
    _write_ref(storage, target)
    meter = _Meter(target, on_progress)
    paths = []
    for i, (f, meta) in enumerate(zip(target.quant.files, metas, strict=True), start=1):
        # huggingface_hub's own lock for this blob: two pulls (or a pull and an
        # `hf download`) never write the same file at once; the second waits, then finds it.
        lock = cache / ".locks" / storage.name / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            blob = _ensure_blob(target, f, meta, storage, meter, retry, i)
        paths.append(_link(storage, target.revision, f.path, blob))
    meter.set(target.quant.files[-1].size, force=True)
    return paths


def _write_ref(storage: Path, target: PullTarget) -> None:
    """`refs/<branch>` → the commit, and that commit's (maybe empty) snapshot folder, as
    huggingface_hub writes them before a download: a ref to a missing snapshot would make
    `scan_cache_dir` skip the whole repo as corrupted."""
    (storage / "snapshots" / target.revision).mkdir(parents=True, exist_ok=True)
    if target.branch is None or target.branch == target.revision:
        return
    ref = storage / "refs" / target.branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.exists() and ref.read_text() == target.revision:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(target.revision)
    os.replace(tmp, ref)


def _link(storage: Path, revision: str, path: str, blob: Path) -> Path:
    """`snapshots/<commit>/<path>` → `../../blobs/<etag>`, relative, as huggingface_hub links."""
    pointer = storage / "snapshots" / revision / PurePosixPath(path)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return pointer
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    os.symlink(target, pointer)
    return pointer


def _ensure_blob(
    target: PullTarget,
    f: HubFile,
    meta: _FileMeta,
    storage: Path,
    meter: _Meter,
    retry: RetryPolicy,
    index: int,
) -> Path:
    blob = storage / "blobs" / meta.etag
    expected = _expected_for(f, meta.etag)
    if blob.exists():
        _verify_existing(target, f, blob, expected, meter, index)
        return blob
    meter.start_file(index, f, "download")
    partial = blob.with_name(meta.etag + ".incomplete")
    digest = _download(target, f, meta, partial, expected, meter, retry)
    if expected is not None and digest != expected.digest:
        partial.unlink(missing_ok=True)
        raise _mismatch(target, f, expected, str(digest), "the download was deleted")
    os.replace(partial, blob)
    if expected is not None:
        modelcache.record_verified(blob, expected.digest)
    return blob


def _verify_existing(
    target: PullTarget,
    f: HubFile,
    blob: Path,
    expected: _Expected | None,
    meter: _Meter,
    index: int,
) -> None:
    """A blob already there (earlier pull, other tool): hash it once, unless already done."""
    if expected is None or modelcache.is_verified(blob, expected.digest):
        meter.start_file(index, f, "download")
        meter.set(f.size)
        return
    meter.start_file(index, f, "verify")
    digest = hash_file(blob, expected, meter.set)
    if digest != expected.digest:
        remove_blob(blob)
        raise _mismatch(target, f, expected, digest, "the cached file was deleted")
    modelcache.record_verified(blob, expected.digest)


def remove_blob(blob: Path) -> None:
    """Take a bad blob out of use: the snapshot links to it, then the blob itself."""
    snapshots = blob.parent.parent / "snapshots"
    for link in snapshots.rglob("*") if snapshots.is_dir() else ():
        if link.is_symlink() and (link.parent / os.readlink(link)).resolve() == blob.resolve():
            link.unlink()
    modelcache.forget_verified(blob)
    blob.unlink(missing_ok=True)


def _mismatch(
    target: PullTarget, f: HubFile, expected: _Expected, got: str, fate: str
) -> errors.IntegrityError:
    return errors.IntegrityError(
        f"{f.path} from {target.repo} failed its {expected.label} check "
        f"(the hub lists {expected.digest[:16]}…, the bytes give {got[:16]}…); {fate}",
        hint="run the pull again; if it fails the same way, the hub's copy is damaged: "
        "try another repo or quant",
    )


def _download(
    target: PullTarget,
    f: HubFile,
    meta: _FileMeta,
    partial: Path,
    expected: _Expected | None,
    meter: _Meter,
    retry: RetryPolicy,
) -> str | None:
    """Bring `partial` to the full size, resuming from its bytes; returns the digest."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > meta.size:  # not this file's bytes: start over
        partial.write_bytes(b"")
        have = 0
    hasher = _Hasher(expected) if expected is not None else None
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
    meta: _FileMeta,
    partial: Path,
    hasher: _Hasher | None,
    meter: _Meter,
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
                f"{format_bytes(_size(partial))} of {format_bytes(meta.size)} kept",
                hint="run the same pull again: it resumes from there",
            ) from reason
        time.sleep(retry.wait(max(failures, 1)))
        location = _fresh_location(target, f, location)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fresh_location(target: PullTarget, f: HubFile, old: str) -> str:
    """A storage URL is signed for a limited time: ask the hub again before retrying."""
    try:
        return _file_meta(target, f).location
    except HubUnreachableError:
        return old  # still no network: the next attempt fails (and counts) on its own


def _stream_once(
    target: PullTarget,
    location: str,
    partial: Path,
    size: int,
    hasher: _Hasher | None,
    meter: _Meter,
) -> None:
    """One GET from the current size of `partial` to the end; keeps every byte received."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = _hub_headers()
    if not _same_origin(location, hub_endpoint()):
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
    if status in (401, 403) and _same_origin(str(r.url), hub_endpoint()):
        raise _auth_error(target.repo, status)
    if status in (401, 403):
        raise _Transient(f"storage answered HTTP {status}; asking the hub for a fresh URL")
    if status == 416:
        # The partial file is longer than what the server has: it cannot be resumed.
        partial_reset = f"HTTP 416 at byte {have:,} of {size:,}; starting the file over"
        raise _RangeRefused(partial_reset)
    r.read()
    with _hub_errors(target.repo, "downloading"):
        hf_raise_for_status(r)


def _write_body(
    r: httpx2.Response,
    partial: Path,
    have: int,
    size: int,
    hasher: _Hasher | None,
    meter: _Meter,
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
            out.write(data)
            if hasher is not None:
                hasher.feed(data)
            have += len(data)
            meter.set(have)

        try:
            for piece in r.iter_raw():
                pieces.append(piece)
                pending += len(piece)
                if pending >= _CHUNK:
                    flush()
                    if have > size:
                        raise errors.DownloadError(
                            f"the hub sent more than the {size:,} bytes it listed",
                            hint="run the pull again later",
                        )
        finally:
            flush()  # also on Ctrl-C or a dropped connection: those bytes are kept


# ------------------------------------------------------------------------------ entry points


Confirm = Callable[[PullTarget], bool]


def pull(
    ref: ModelRef | str,
    quant: str | None = None,
    *,
    on_progress: ProgressFn | None = None,
    confirm: Confirm | None = None,
    choose: Chooser | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> list[Path]:
    """Fetch a quant of a model into the HF cache (nothing when it is there and verified).

    `confirm` sees what will be fetched before any byte and may say no (UsageError). Offline
    (or with the hub unreachable), a complete cached copy is returned; with none, OfflineError
    (or HubUnreachableError) says what is missing.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.kind == "file":
        assert ref.path is not None
        return local_files(ref.path)
    if quant:
        ref = ref.with_quant(quant)
    if offline():
        return _cached_or_offline_error(ref, on_progress)
    try:
        target = plan_pull(ref, choose=choose)
    except HubUnreachableError:
        # No network: a complete copy in the cache is as good as an up-to-date one.
        cached = modelcache.find_cached(ref.repos, ref.quant)
        if cached is None:
            raise
        return verify_cached(cached, on_progress)
    if confirm is not None and not confirm(target):
        raise errors.UsageError(
            f"download of {target.reference} not confirmed", hint="pass --yes to skip the question"
        )
    return fetch(target, on_progress=on_progress, retry=retry)


def resolve_local(
    ref: ModelRef | str,
    *,
    pull_if_missing: bool,
    confirm: Confirm | None = None,
    on_progress: ProgressFn | None = None,
    on_notice: Callable[[str], None] | None = None,
    choose: Chooser | None = None,
) -> list[Path]:
    """Any model reference → local GGUF paths (first shard first), for `run` and `chat`.

    A file is used as it is. A model in the cache is used without asking the hub (checked
    once against its hash). Otherwise it is pulled when `pull_if_missing` (after `confirm`);
    offline, a clear OfflineError says what is missing.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.kind == "file":
        assert ref.path is not None
        return local_files(ref.path)
    cached = modelcache.find_cached(ref.repos, ref.quant)
    if cached is not None:
        return verify_cached(cached, on_progress)
    if offline():
        raise _offline_error(ref)
    if not pull_if_missing:
        raise errors.ModelNotFoundError(
            f"{ref} is not downloaded", hint=f"download it first: qwenrun pull {ref}"
        )
    if on_notice is not None:
        on_notice(f"{ref} is not downloaded yet: pulling it")
    return pull(ref, on_progress=on_progress, confirm=confirm, choose=choose)


def _cached_or_offline_error(ref: ModelRef, on_progress: ProgressFn | None) -> list[Path]:
    cached = modelcache.find_cached(ref.repos, ref.quant)
    if cached is None:
        raise _offline_error(ref)
    return verify_cached(cached, on_progress)


def _offline_error(ref: ModelRef) -> errors.OfflineError:
    partial = modelcache.partial_for(ref.repos, ref.quant)
    if partial:
        p = partial[0]
        have = {PurePosixPath(x.name).name for x in p.paths}
        message = (
            f"offline, and {reference_for(p.repo, p.quant)} is only partly downloaded "
            f"({len(have)} of {p.n_expected} files complete"
            + (f", {len(p.partial_blobs)} partial" if p.partial_blobs else "")
            + ")"
        )
    else:
        where = ", ".join(ref.repos)
        message = (
            f"offline, and {ref} is not in the cache "
            f"(looked for {where} in {config.hf_hub_cache()})"
        )
    return errors.OfflineError(
        message, hint=f"connect and run: qwenrun pull {ref} (or unset HF_HUB_OFFLINE)"
    )


def verify_cached(
    cached: modelcache.CachedQuant, on_progress: ProgressFn | None = None
) -> list[Path]:
    """Hash the cached files not yet verified (once), against the sha256 their blob names carry."""
    files = tuple(
        HubFile(path=p.name, size=p.stat().st_size, sha256=None, blob_id=None) for p in cached.paths
    )
    target = PullTarget(cached.repo, cached.revision, None, QuantFiles(cached.quant, files))
    meter = _Meter(target, on_progress)
    for i, (path, f) in enumerate(zip(cached.paths, files, strict=True), start=1):
        blob = path.resolve()
        name = blob.name
        expected = (
            _Expected("sha256", name, f.size)
            if modelcache.SHA256_RE.match(name)
            else _Expected("sha1", name, f.size)
            if re.fullmatch(r"[0-9a-f]{40}", name)
            else None
        )
        _verify_existing(target, f, blob, expected, meter, i)
    return list(cached.paths)


def local_files(path: Path) -> list[Path]:
    """A local GGUF and, for a split model named by any shard, all its shards in order."""
    m = _SPLIT_RE.search(path.name)
    if not m:
        return [path]
    n = int(m.group(2))
    stem = path.name[: m.start()]
    shards = [path.with_name(f"{stem}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise errors.ModelNotFoundError(
            f"split model {stem} is missing {len(missing)} of {n} files: {', '.join(missing[:3])}",
            hint="all shards must sit in the same folder",
        )
    return shards


def format_bytes(n: float) -> str:
    """Decimal units, as the hub shows sizes: 17.7 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
