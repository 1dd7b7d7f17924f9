"""The Hugging Face cache on disk: its layout, the GGUF quants it holds, and qwenrun's notes.

Contract: this module knows huggingface_hub's cache layout (`models--owner--repo/blobs/`,
`snapshots/<commit>/<path>` relative links, `refs/<branch>`) and writes it the way
huggingface_hub does (`write_ref`, `link`, `remove_blob`). It reads the cache through
`scan_cache_dir`, so files fetched by other tools count, grouping files into quants with
`names.group_files`; `matching` (with `find_cached`, `partial_for`) is the one lookup of cached
models by repo and quant, which `run`, `rm`, `plan` and the default model all use. It keeps two
kinds of notes under `QWENRUN_HOME`: verification records (a blob whose sha256 was checked,
keyed by its path, size and mtime, so a 100 GB file is hashed once) and pull records (which
files a started `pull` wants, so a partial download can be listed and resumed). It plans the
removal of files through huggingface_hub's own deletion strategy (per file, so blobs another
revision uses are kept); what that leaves empty (a snapshot folder, the refs to it, the repo
folder) it removes itself, inside the folder of the repo named, never by a bare commit hash,
which other repos may share. It never touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from qwenrun import catalog, config
from qwenrun.atomic import write_atomic
from qwenrun.hub import names

# ------------------------------------------------------------------------------ layout


def repo_folder(cache: Path, repo: str) -> Path:
    """huggingface_hub's folder for a model repo: `models--owner--name`."""
    return cache / ("models--" + repo.replace("/", "--"))


def write_ref(storage: Path, revision: str, branch: str | None) -> None:
    """`refs/<branch>` → the commit, and that commit's (maybe empty) snapshot folder, as
    huggingface_hub writes them before a download: a ref to a missing snapshot would make
    `scan_cache_dir` skip the whole repo as corrupted."""
    (storage / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    if branch is None or branch == revision:
        return
    ref = storage / "refs" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.exists() and ref.read_text() == revision:
        return
    write_atomic(ref, revision)


def link(storage: Path, revision: str, path: str, blob: Path) -> Path:
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


def remove_blob(blob: Path) -> None:
    """Take a bad blob out of use: the snapshot links to it, then the blob itself."""
    snapshots = blob.parent.parent / "snapshots"
    for pointer in snapshots.rglob("*") if snapshots.is_dir() else ():
        if (
            pointer.is_symlink()
            and (pointer.parent / os.readlink(pointer)).resolve() == blob.resolve()
        ):
            pointer.unlink()
    forget_verified(blob)
    blob.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ notes


def _notes_dir(kind: str) -> Path:
    return config.qwenrun_home() / kind


def _write_json(path: Path, obj: object) -> None:
    """Write a note, best effort: a home that cannot take it (a file, a full disk, no
    permission) only means checking again next time, never a failed command."""
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps(obj, indent=1))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a missing or half-written note only means "not known": check again


def _verified_note(blob: Path) -> Path:
    key = hashlib.sha1(str(blob.resolve()).encode()).hexdigest()
    return _notes_dir("verified") / f"{key}.json"


def record_verified(blob: Path, sha256: str) -> None:
    """Note that `blob` (as it is now: size and mtime) hashed to `sha256`."""
    st = blob.stat()
    _write_json(
        _verified_note(blob),
        {
            "blob": str(blob.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256,
            "verified_at": time.time(),
        },
    )


def is_verified(blob: Path, sha256: str | None = None) -> bool:
    """Whether `blob` was hashed by qwenrun and has not changed since (and matched `sha256`)."""
    note = _read_json(_verified_note(blob))
    if not isinstance(note, dict) or not blob.exists():
        return False
    st = blob.stat()
    same = note.get("size") == st.st_size and note.get("mtime_ns") == st.st_mtime_ns
    return same and (sha256 is None or note.get("sha256") == sha256)


def forget_verified(blob: Path) -> None:
    with contextlib.suppress(OSError):  # no note where there is no notes folder
        _verified_note(blob).unlink(missing_ok=True)


@dataclass(frozen=True)
class PulledFile:
    path: str
    size: int
    sha256: str | None
    etag: str | None  # the blob name in the cache, once the hub told it


@dataclass(frozen=True)
class PullRecord:
    """What one `pull` of a quant set out to fetch."""

    repo: str
    revision: str
    quant: str
    files: tuple[PulledFile, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def _pull_note(repo: str, quant: str) -> Path:
    safe_quant = re.sub(r"[^A-Za-z0-9._-]", "_", quant)
    return _notes_dir("pulls") / ("models--" + repo.replace("/", "--")) / f"{safe_quant}.json"


def record_pull(record: PullRecord) -> None:
    _write_json(
        _pull_note(record.repo, record.quant),
        {
            "repo": record.repo,
            "revision": record.revision,
            "quant": record.quant,
            "files": [f.__dict__ for f in record.files],
        },
    )


def forget_pull(repo: str, quant: str) -> None:
    with contextlib.suppress(OSError):
        _pull_note(repo, quant).unlink(missing_ok=True)


def pull_records() -> list[PullRecord]:
    root = _notes_dir("pulls")
    records: list[PullRecord] = []
    for note in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        data = _read_json(note)
        if not isinstance(data, dict):
            continue
        files = tuple(PulledFile(**f) for f in data.get("files", []))
        records.append(PullRecord(data["repo"], data["revision"], data["quant"], files))
    return records


# ------------------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class CachedQuant:
    """One quant of one repo revision as found in the cache (complete or not)."""

    repo: str
    revision: str
    quant: str
    paths: tuple[Path, ...]  # snapshot paths of the files present, shard order
    n_expected: int
    size_on_disk: int  # bytes of present files plus partial downloads
    expected_size: int | None  # from a pull record, when qwenrun started this download
    verified: bool
    refs: tuple[str, ...] = ()
    partial_blobs: tuple[Path, ...] = ()  # `.incomplete` files of this quant
    # huggingface_hub's view of the present files, for deletion
    cached_files: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def complete(self) -> bool:
        return len(self.paths) == self.n_expected and not self.partial_blobs

    @property
    def first(self) -> Path | None:
        return self.paths[0] if self.paths else None


def _scan(cache: Path) -> Any:
    from huggingface_hub import scan_cache_dir

    if not cache.is_dir():
        return None
    return scan_cache_dir(cache)


def cached_quants(cache: Path | None = None) -> list[CachedQuant]:
    """Every GGUF quant in the cache, plus the partial downloads qwenrun has records of."""
    cache = cache or config.hf_hub_cache()
    info = _scan(cache)
    found: dict[tuple[str, str, str], CachedQuant] = {}
    for repo in info.repos if info is not None else ():
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            for cq in _revision_quants(repo.repo_id, rev):
                found[(cq.repo.lower(), cq.revision, cq.quant.lower())] = cq
    for record in pull_records():
        key = (record.repo.lower(), record.revision, record.quant.lower())
        merged = _with_record(cache, found.get(key), record)
        if merged.paths or merged.partial_blobs:  # a record of nothing on disk is no entry
            found[key] = merged
    return sorted(found.values(), key=lambda c: (c.repo.lower(), catalog.quant_rank(c.quant)))


def _revision_quants(repo_id: str, rev: Any) -> list[CachedQuant]:
    by_rel = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
    groups, _mmproj = names.group_files(by_rel)
    out = []
    for g in groups:
        files = [by_rel[p] for p in g.paths]
        out.append(
            CachedQuant(
                repo=repo_id,
                revision=rev.commit_hash,
                quant=g.quant,
                paths=tuple(f.file_path for f in files),
                n_expected=g.n_expected,
                size_on_disk=sum(f.size_on_disk for f in files),
                expected_size=None,
                verified=all(is_verified(f.blob_path) for f in files),
                refs=tuple(sorted(rev.refs)),
                cached_files=tuple(files),
            )
        )
    return out


def _with_record(cache: Path, found: CachedQuant | None, record: PullRecord) -> CachedQuant:
    """Merge what a pull record knows: the files still to come and their partial bytes."""
    blobs = repo_folder(cache, record.repo) / "blobs"
    partial = tuple(
        p
        for f in record.files
        if f.etag is not None and (p := blobs / f"{f.etag}.incomplete").exists()
    )
    partial_bytes = sum(p.stat().st_size for p in partial)
    if found is None:
        return CachedQuant(
            repo=record.repo,
            revision=record.revision,
            quant=record.quant,
            paths=(),
            n_expected=len(record.files),
            size_on_disk=partial_bytes,
            expected_size=record.total_size,
            verified=False,
            partial_blobs=partial,
        )
    return CachedQuant(
        repo=found.repo,
        revision=found.revision,
        quant=found.quant,
        paths=found.paths,
        n_expected=max(found.n_expected, len(record.files)),
        size_on_disk=found.size_on_disk + partial_bytes,
        expected_size=record.total_size,
        verified=found.verified,
        refs=found.refs,
        partial_blobs=partial,
        cached_files=found.cached_files,
    )


def matching(
    repos: Sequence[str],
    quant: str | None,
    *,
    complete: bool | None = None,
    cache: Path | None = None,
) -> list[CachedQuant]:
    """The one lookup of cached models by name: the quants of `repos` in the cache, `quant`
    only when given (spelled either way: `q4_k_m` is `Q4_K_M`), complete ones only (True),
    incomplete ones only (False) or both (None); best first: a revision a ref (`main`) points
    to, then the earlier repo in `repos`, then the better quant."""
    order = {r.lower(): i for i, r in enumerate(repos)}
    want = catalog.normalize_quant(quant) if quant else None
    found = [
        c
        for c in cached_quants(cache)
        if c.repo.lower() in order
        and (complete is None or c.complete == complete)
        and (want is None or catalog.normalize_quant(c.quant) == want)
    ]
    found.sort(
        key=lambda c: (not c.refs, order[c.repo.lower()], catalog.quant_rank(c.quant), c.quant)
    )
    return found


def find_cached(
    repos: Sequence[str], quant: str | None, cache: Path | None = None
) -> CachedQuant | None:
    """The best complete copy of `quant` (any quant when None) of one of `repos`; None when
    nothing complete is cached."""
    found = matching(repos, quant, complete=True, cache=cache)
    return found[0] if found else None


def partial_for(
    repos: Sequence[str], quant: str | None, cache: Path | None = None
) -> list[CachedQuant]:
    """Incomplete copies of `quant` of `repos` (for messages saying what is missing)."""
    return matching(repos, quant, complete=False, cache=cache)


# ------------------------------------------------------------------------------ removal


@dataclass(frozen=True)
class Removal:
    """What `rm` will delete and the bytes that frees, before anything is touched."""

    quants: tuple[CachedQuant, ...]
    freed_bytes: int
    strategy: Any  # huggingface_hub's DeleteCacheStrategy (None when only partial files)
    partial_blobs: tuple[Path, ...]

    def execute(self, cache: Path | None = None) -> None:
        if self.strategy is not None:
            self.strategy.execute()
        for p in self.partial_blobs:
            p.unlink(missing_ok=True)
        for cq in self.quants:
            for f in cq.cached_files:
                forget_verified(f.blob_path)
            forget_pull(cq.repo, cq.quant)
        _drop_empty_revisions(cache or config.hf_hub_cache(), {c.repo for c in self.quants})


def plan_removal(quants: Sequence[CachedQuant], cache: Path | None = None) -> Removal:
    """Delete these quants' files through huggingface_hub (blobs shared elsewhere are kept)."""
    cache = cache or config.hf_hub_cache()
    files = [f for cq in quants for f in cq.cached_files]
    strategy = None
    freed = 0
    if files:
        info = _scan(cache)
        strategy = info.delete_files(*files)
        freed = strategy.expected_freed_size
    partial = tuple(p for cq in quants for p in cq.partial_blobs)
    freed += sum(p.stat().st_size for p in partial if p.exists())
    return Removal(tuple(quants), freed, strategy, partial)


def _drop_empty_revisions(cache: Path, repos: set[str]) -> None:
    """Revisions left without files go too (and the repo folder with its last one).

    Each repo is cleaned inside its own folder. (huggingface_hub's `delete_revisions` takes
    bare commit hashes and deletes the first cached revision with that hash, whichever repo
    holds it: two repos at the same commit would lose the wrong one.)
    """
    info = _scan(cache)
    if info is None:
        return
    wanted = {r.lower() for r in repos}
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id.lower() not in wanted:
            continue
        folder = Path(repo.repo_path)
        if any((folder / "blobs").glob("*.incomplete")):
            # Partial downloads a later pull resumes: keep the folder and its revisions
            # (a repo folder without snapshots is one huggingface_hub calls corrupted).
            continue
        empty = [rev for rev in repo.revisions if not rev.files]
        if len(empty) == len(repo.revisions):
            shutil.rmtree(folder, ignore_errors=True)  # the repo goes with its last revision
            continue
        for rev in empty:
            _remove_revision(folder, rev.commit_hash)


def _remove_revision(folder: Path, commit: str) -> None:
    """`snapshots/<commit>` and every `refs/*` naming it, inside one repo's folder only."""
    snapshot = folder / "snapshots" / commit
    if snapshot.parent == folder / "snapshots" and commit not in ("", ".", ".."):
        shutil.rmtree(snapshot, ignore_errors=True)
    refs = folder / "refs"
    for ref in refs.rglob("*") if refs.is_dir() else ():
        if ref.is_file() and ref.read_text().strip() == commit:
            ref.unlink()
