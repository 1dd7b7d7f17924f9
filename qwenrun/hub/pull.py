"""Pulling a quant into the Hugging Face cache, and finding a model's files for `run`.

Contract: `pull(ref)` lists the repo, picks the quant (the caller's `Chooser`), asks the
caller's `confirm` before the first byte, then fetches every file verified and resumable into
the standard cache layout (`blobs/`, `snapshots/<commit>/<path>` links, `refs/<branch>`), so
other tools find them, each blob under huggingface_hub's own lock (two pulls, or a pull and
`hf download`, never write one file at once); a `confirm` that says no is `errors.Declined` (a
choice, not an error). A disk that fills up mid-pull is one `DiskSpaceError` saying what is on
disk and what is missing; the partial file stays, so the same command resumes.
`resolve_local(ref)` gives `run` and `chat` local paths: a file as it is (all shards of a split
model, first first), a complete cached copy without asking the hub (hashed once), or a pull.
Offline (`HF_HUB_OFFLINE`, or the hub unreachable) a complete cached copy still works; a missing
one is an `OfflineError` naming what is missing (with the hub unreachable, its
`HubUnreachableError`). Nothing here prints: progress and questions go to the caller's
callbacks, and progress only for real work (a download, or the first hash of a cached file),
never for a copy already verified.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

from huggingface_hub.utils import WeakFileLock

from qwenrun import config, errors
from qwenrun.hub import cache, names
from qwenrun.hub.listing import Chooser, HubFile, PullTarget, QuantFiles, plan_pull
from qwenrun.hub.refs import ModelRef, parse_ref, reference_for
from qwenrun.hub.session import HubUnreachableError, offline
from qwenrun.hub.transfer import (
    DEFAULT_RETRY,
    FileMeta,
    Meter,
    ProgressFn,
    RetryPolicy,
    check_disk,
    disk_full,
    download,
    file_meta,
)
from qwenrun.hub.verify import SHA1_RE, SHA256_RE, Expected, expected_for, hash_file, mismatch


def cached_copy(target: PullTarget) -> cache.CachedQuant | None:
    """The complete cached copy of exactly this quant at this commit, if there is one."""
    found = cache.find_cached([target.repo], target.quant.quant)
    return found if found is not None and found.revision == target.revision else None


def fetch(
    target: PullTarget,
    *,
    on_progress: ProgressFn | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[Path]:
    """Download and verify every file of `target` into the HF cache; the snapshot paths."""
    root = config.hf_hub_cache()
    storage = cache.repo_folder(root, target.repo)
    metas = [file_meta(target, f) for f in target.quant.files]
    check_disk(target, metas, storage)
    meter = Meter(target, on_progress)
    paths = []
    try:
        cache.record_pull(
            cache.PullRecord(
                repo=target.repo,
                revision=target.revision,
                quant=target.quant.quant,
                files=tuple(
                    cache.PulledFile(f.path, f.size, f.sha256, m.etag)
                    for f, m in zip(target.quant.files, metas, strict=True)
                ),
            )
        )
        cache.write_ref(storage, target.revision, target.branch)
        for i, (f, meta) in enumerate(zip(target.quant.files, metas, strict=True), start=1):
            # huggingface_hub's own lock for this blob: two pulls (or a pull and an
            # `hf download`) never write the same file at once; the second waits, then finds it.
            lock = root / ".locks" / storage.name / f"{meta.etag}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with WeakFileLock(lock):
                blob = _ensure_blob(target, f, meta, storage, meter, retry, i)
            paths.append(cache.link(storage, target.revision, f.path, blob))
    except OSError as err:
        # The free space was checked before the first byte, but the disk is shared (or a
        # quota or file size limit applies): a write can still find no room.
        full = disk_full(err, target, metas, storage)
        if full is None:
            raise
        raise full from err
    meter.finish()
    return paths


def _ensure_blob(
    target: PullTarget,
    f: HubFile,
    meta: FileMeta,
    storage: Path,
    meter: Meter,
    retry: RetryPolicy,
    index: int,
) -> Path:
    blob = storage / "blobs" / meta.etag
    expected = expected_for(f, meta.etag)
    if blob.exists():
        _verify_existing(target, f, blob, expected, meter, index)
        return blob
    meter.start_file(index, f, "download")
    partial = blob.with_name(meta.etag + ".incomplete")
    digest = download(target, f, meta, partial, expected, meter, retry)
    if expected is not None and digest != expected.digest:
        partial.unlink(missing_ok=True)
        raise mismatch(target, f, expected, str(digest), "the download was deleted")
    os.replace(partial, blob)
    if expected is not None:
        cache.record_verified(blob, expected.digest)
    return blob


def _verify_existing(
    target: PullTarget,
    f: HubFile,
    blob: Path,
    expected: Expected | None,
    meter: Meter,
    index: int,
) -> None:
    """A blob already there (earlier pull, other tool): hash it once, unless already done.

    Only the hashing is reported: a file already verified has nothing to show."""
    if expected is None or cache.is_verified(blob, expected.digest):
        return
    meter.start_file(index, f, "verify")
    digest = hash_file(blob, expected, meter.set)
    if digest != expected.digest:
        cache.remove_blob(blob)
        raise mismatch(target, f, expected, digest, "the cached file was deleted")
    cache.record_verified(blob, expected.digest)


# ------------------------------------------------------------------------------ entry points


Confirm = Callable[[PullTarget], bool]


def pull(
    ref: ModelRef | str,
    quant: str | None = None,
    *,
    on_progress: ProgressFn | None = None,
    confirm: Confirm | None = None,
    choose: Chooser | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[Path]:
    """Fetch a quant of a model into the HF cache (nothing when it is there and verified).

    `confirm` sees what will be fetched before any byte and may say no (`errors.Declined`,
    which is not an error: the caller says so without "error:"). Offline
    (or with the hub unreachable), a complete cached copy is returned; with none, OfflineError
    (or HubUnreachableError) says what is missing.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.kind == "file":
        assert ref.path is not None
        return names.local_shards(ref.path)
    if quant:
        ref = ref.with_quant(quant)
    if offline():
        return _cached_or_offline_error(ref, on_progress)
    try:
        target = plan_pull(ref, choose=choose)
    except HubUnreachableError:
        # No network: a complete copy in the cache is as good as an up-to-date one.
        cached = cache.find_cached(ref.repos, ref.quant)
        if cached is None:
            raise
        return verify_cached(cached, on_progress)
    target = replace(target, cached=cached_copy(target) is not None)
    if confirm is not None and not confirm(target):
        raise errors.Declined(f"Not downloading {target.reference}.")
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
        return names.local_shards(ref.path)
    cached = cache.find_cached(ref.repos, ref.quant)
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
    cached = cache.find_cached(ref.repos, ref.quant)
    if cached is None:
        raise _offline_error(ref)
    return verify_cached(cached, on_progress)


def _offline_error(ref: ModelRef) -> errors.OfflineError:
    partial = cache.partial_for(ref.repos, ref.quant)
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


def verify_cached(cached: cache.CachedQuant, on_progress: ProgressFn | None = None) -> list[Path]:
    """Hash the cached files not yet verified (once), against the sha256 their blob names carry."""
    files = tuple(
        HubFile(path=p.name, size=p.stat().st_size, sha256=None, blob_id=None) for p in cached.paths
    )
    target = PullTarget(cached.repo, cached.revision, None, QuantFiles(cached.quant, files))
    meter = Meter(target, on_progress)
    for i, (path, f) in enumerate(zip(cached.paths, files, strict=True), start=1):
        blob = path.resolve()
        name = blob.name
        expected = (
            Expected("sha256", name, f.size)
            if SHA256_RE.match(name)
            else Expected("sha1", name, f.size)
            if SHA1_RE.match(name)
            else None
        )
        _verify_existing(target, f, blob, expected, meter, i)
    meter.finish()
    return list(cached.paths)
