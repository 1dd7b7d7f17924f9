"""The downloader against a loopback hub: cache layout, resume, verification, refusals."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir

from qwenrun import errors
from qwenrun.hub import cache, listing, names, pull, refs, session, transfer
from qwenrun.testing.hub_server import HubServer

REPO = "acme/Tiny-GGUF"
SINGLE = "Tiny-Q4_K_M.gguf"
SHARDS = ("Q8_0/Tiny-Q8_0-00001-of-00002.gguf", "Q8_0/Tiny-Q8_0-00002-of-00002.gguf")
FAST = transfer.RetryPolicy(attempts=3, base_wait_s=0.001, max_wait_s=0.01)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_models) -> HubServer:
    single = tiny_models("qwen3moe")
    first = tiny_models("qwen3moe", split=2)
    second = first.with_name(first.name.replace("-00001-of-", "-00002-of-"))
    server = HubServer().start()
    server.add_repo(
        REPO,
        {
            SINGLE: single,
            SHARDS[0]: first,
            SHARDS[1]: second,
            "mmproj-F16.gguf": b"not a model",
            "README.md": b"# tiny\n",
        },
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def cache_dir() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def storage() -> Path:
    return cache_dir() / "models--acme--Tiny-GGUF"


def content_gets(hub: HubServer, path: str) -> list[str | None]:
    """The Range header of every GET of the file's bytes."""
    return [r.range for r in hub.requests_for(path, "GET") if r.path.startswith("/_content/")]


# ------------------------------------------------------------------------------ naming


@pytest.mark.parametrize(
    ("paths", "quants"),
    [
        (["M-Q4_K_M.gguf", "M-Q8_0.gguf"], {"Q4_K_M": 1, "Q8_0": 1}),
        (
            ["Q8_0/M-Q8_0-00002-of-00002.gguf", "Q8_0/M-Q8_0-00001-of-00002.gguf"],
            {"Q8_0": 2},
        ),
        (["UD-Q4_K_XL/M-UD-Q4_K_XL-00001-of-00003.gguf"], {"UD-Q4_K_XL": 1}),
        (["mmproj-F16.gguf", "README.md", "M-Q6_K.gguf"], {"Q6_K": 1}),
    ],
)
def test_group_files_makes_quants(paths, quants):
    groups, mmproj = names.group_files(paths)
    assert {g.quant: len(g.paths) for g in groups} == quants
    assert mmproj == [p for p in paths if p.startswith("mmproj")]


def test_split_set_is_ordered_and_knows_its_size():
    groups, _ = names.group_files(
        ["Q8_0/M-Q8_0-00002-of-00003.gguf", "Q8_0/M-Q8_0-00001-of-00003.gguf"]
    )
    (g,) = groups
    assert g.paths == ("Q8_0/M-Q8_0-00001-of-00003.gguf", "Q8_0/M-Q8_0-00002-of-00003.gguf")
    assert g.n_expected == 3 and not g.complete


@pytest.mark.parametrize("bad", ["../escape.gguf", "a/../../b.gguf", "/etc/x.gguf", "a//b.gguf"])
def test_unsafe_repo_paths_are_refused(bad):
    with pytest.raises(errors.DownloadError, match="outside the cache"):
        listing.safe_repo_path("o/r", bad)


# ------------------------------------------------------------------------------ listing


@pytest.mark.slow
def test_list_quants_groups_the_repo(hub):
    found = listing.list_repo(REPO)
    assert found.revision == hub.repos[REPO].commit
    by_name = {q.quant: q for q in found.quants}
    assert set(by_name) == {"Q4_K_M", "Q8_0"}
    assert by_name["Q8_0"].paths == SHARDS
    single = by_name["Q4_K_M"].files[0]
    assert single.size == hub.file(REPO, SINGLE).size
    assert single.sha256 == hub.file(REPO, SINGLE).sha256
    assert [f.path for f in found.mmproj] == ["mmproj-F16.gguf"]


def test_tree_entry_escaping_the_cache_refuses_the_repo(hub):
    hub.add_tree_entry(REPO, "../../evil.gguf")
    with pytest.raises(errors.DownloadError, match="outside the cache"):
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert not storage().exists()
    assert not content_gets(hub, "evil.gguf")


# ------------------------------------------------------------------------------ pulling


def test_single_file_lands_in_the_standard_cache(hub):
    (path,) = pull.pull(f"{REPO}:q4_k_m", retry=FAST)
    served = hub.file(REPO, SINGLE)
    commit = hub.repos[REPO].commit
    assert path == storage() / "snapshots" / commit / SINGLE
    assert path.is_symlink() and not os.path.isabs(os.readlink(path))
    assert path.resolve() == storage() / "blobs" / served.sha256
    assert path.read_bytes() == served.source.read_bytes()
    assert (storage() / "refs" / "main").read_text() == commit
    # Other tools find it: huggingface_hub's own lookup and its cache scan.
    found = hf_hub_download(REPO, SINGLE, cache_dir=cache_dir(), local_files_only=True)
    assert Path(found) == path
    info = scan_cache_dir(cache_dir())
    assert not info.warnings and not info.incomplete_files


def test_split_quant_in_a_folder_is_pulled_whole(hub):
    paths = pull.pull(REPO, "Q8_0", retry=FAST)
    assert [p.relative_to(storage() / "snapshots" / hub.repos[REPO].commit) for p in paths] == [
        Path(s) for s in SHARDS
    ]
    for p, s in zip(paths, SHARDS, strict=True):
        assert p.read_bytes() == hub.file(REPO, s).source.read_bytes()
    (cq,) = [c for c in cache.cached_quants() if c.quant == "Q8_0"]
    assert cq.complete and cq.verified and cq.n_expected == 2


def test_progress_covers_the_whole_quant(hub):
    seen: list[transfer.PullProgress] = []
    pull.pull(REPO, "Q8_0", on_progress=seen.append, retry=FAST)
    total = sum(hub.file(REPO, s).size for s in SHARDS)
    assert {p.total_bytes for p in seen} == {total}
    assert {p.file_index for p in seen} == {1, 2} and {p.n_files for p in seen} == {2}
    assert seen[-1].done_bytes == total
    assert [p.done_bytes for p in seen] == sorted(p.done_bytes for p in seen)


def test_dropped_connection_is_resumed_with_a_range_request(hub):
    cut = 300_000
    hub.cut_after(REPO, SINGLE, cut, times=1)
    (path,) = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert path.read_bytes() == hub.file(REPO, SINGLE).source.read_bytes()
    assert content_gets(hub, SINGLE) == [None, f"bytes={cut}-"]


@pytest.mark.slow
def test_interrupted_pull_resumes_in_the_next_run(hub):
    cut = 400_000
    hub.cut_after(REPO, SINGLE, cut, times=None)  # every attempt dies at the same byte
    with pytest.raises(errors.DownloadError, match=r"connection dropped.*400.0 kB of 1.3 MB") as e:
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert "resumes" in (e.value.hint or "")
    sha = hub.file(REPO, SINGLE).sha256
    partial = storage() / "blobs" / f"{sha}.incomplete"
    assert partial.stat().st_size == cut
    (cq,) = cache.cached_quants()
    assert (
        not cq.complete
        and cq.size_on_disk == cut
        and cq.expected_size == hub.file(REPO, SINGLE).size
    )
    info = scan_cache_dir(cache_dir())  # the half-done pull leaves a cache other tools accept
    assert not info.warnings
    assert [f.size_on_disk for f in info.incomplete_files] == [cut]

    hub.heal(REPO, SINGLE)
    hub.clear_requests()
    (path,) = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert path.read_bytes() == hub.file(REPO, SINGLE).source.read_bytes()
    assert content_gets(hub, SINGLE) == [f"bytes={cut}-"]  # resumed, never restarted
    assert not partial.exists()


def test_ctrl_c_between_shards_keeps_the_finished_shard(hub):
    def interrupt(p: transfer.PullProgress) -> None:
        if p.file_index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull.pull(REPO, "Q8_0", on_progress=interrupt, retry=FAST)
    hub.clear_requests()
    pull.pull(REPO, "Q8_0", retry=FAST)
    assert content_gets(hub, SHARDS[0]) == []  # not fetched again
    assert content_gets(hub, SHARDS[1]) == [None]


def test_wrong_sha256_fails_and_nothing_is_used(hub):
    hub.advertise_sha256(REPO, SINGLE, "0" * 64)
    with pytest.raises(errors.IntegrityError, match=r"sha256 check.*deleted"):
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    blobs = storage() / "blobs"
    assert not list(blobs.iterdir())
    assert not (storage() / "snapshots").exists() or not list(
        (storage() / "snapshots").rglob("*.gguf")
    )
    assert cache.find_cached([REPO], "Q4_K_M") is None


@pytest.mark.slow
def test_verified_file_is_not_hashed_again_until_it_changes(hub):
    pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    phases: list[str] = []
    pull.pull(f"{REPO}:Q4_K_M", on_progress=lambda p: phases.append(p.phase), retry=FAST)
    # Nothing to do is nothing to show: no "downloading 1/1 … 0.0/1.3 MB" bar.
    assert phases == []
    seen: list[transfer.PullProgress] = []
    pull.resolve_local(f"{REPO}:Q4_K_M", pull_if_missing=False, on_progress=seen.append)
    assert seen == []
    blob = storage() / "blobs" / hub.file(REPO, SINGLE).sha256
    later = time.time() + 5
    os.utime(blob, (later, later))
    phases.clear()
    pull.pull(f"{REPO}:Q4_K_M", on_progress=lambda p: phases.append(p.phase), retry=FAST)
    assert "verify" in phases


def test_corrupted_cached_file_is_taken_out_of_use(hub):
    (path,) = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(errors.IntegrityError, match="cached file was deleted"):
        pull.resolve_local(f"{REPO}:Q4_K_M", pull_if_missing=False)
    assert not blob.exists() and not path.is_symlink()
    assert not scan_cache_dir(cache_dir()).warnings  # no dangling link left behind


def test_huge_advertised_size_is_refused_before_any_byte(hub):
    hub.advertise_size(REPO, SINGLE, 10**18)
    with pytest.raises(errors.DiskSpaceError) as info:
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    message = info.value.message
    assert "1000000.0 TB still to download" in message and "free on" in message
    assert content_gets(hub, SINGLE) == []
    blobs = storage() / "blobs"
    assert not blobs.exists() or not list(blobs.iterdir())


@pytest.mark.parametrize(
    ("code", "cause", "advice"),
    [
        (errno.ENOSPC, "the disk is full", "free at least 839.0 kB on "),
        (errno.EDQUOT, "the disk quota is used up", "free at least 839.0 kB on "),
        (errno.EFBIG, "the file system refused a file this large", "ulimit -f"),
    ],
)
def test_a_write_without_room_says_what_is_there_and_what_is_missing(hub, code, cause, advice):
    # What `fetch` makes of a write that fails for room (tests/test_cli_pull.py makes a real
    # one fail): the bytes on disk, the bytes missing, and the same command to resume.
    target = listing.plan_pull(refs.parse_ref(f"{REPO}:Q4_K_M"))
    metas = [transfer.file_meta(target, f) for f in target.quant.files]
    partial = storage() / "blobs" / f"{metas[0].etag}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 500_000)
    err = transfer.disk_full(OSError(code, os.strerror(code)), target, metas, storage())
    assert isinstance(err, errors.DiskSpaceError)
    assert err.message.startswith(cause) and f"downloading {REPO}:Q4_K_M" in err.message
    assert "500.0 kB of 1.3 MB on disk, 839.0 kB still missing" in err.message
    assert advice in (err.hint or "") and "run the same command" in (err.hint or "")
    assert transfer.disk_full(OSError(errno.EIO, "I/O error"), target, metas, storage()) is None


def test_files_fetched_by_huggingface_hub_are_reused(hub):
    hf_hub_download(REPO, SINGLE, cache_dir=cache_dir(), endpoint=hub.url)
    hub.clear_requests()
    phases: list[str] = []
    paths = pull.resolve_local(
        f"{REPO}:Q4_K_M", pull_if_missing=False, on_progress=lambda p: phases.append(p.phase)
    )
    assert paths[0].read_bytes() == hub.file(REPO, SINGLE).source.read_bytes()
    # Checked once against the sha256 its blob name carries, and only that is shown.
    assert set(phases) == {"verify"}
    assert hub.requests == []
    phases.clear()
    pull.resolve_local(
        f"{REPO}:Q4_K_M", pull_if_missing=False, on_progress=lambda p: phases.append(p.phase)
    )
    assert phases == []


# ------------------------------------------------------------------------------ auth


@pytest.mark.slow
def test_token_required_gives_a_clear_auth_error(hub, monkeypatch):
    hub.token = "hf_secret_value"
    with pytest.raises(errors.AuthError) as info:
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert "HF_TOKEN" in (info.value.hint or "")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(errors.AuthError, match="token in HF_TOKEN"):
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    hub.clear_requests()
    (path,) = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert path.exists()
    # The token goes to the hub only, never to the storage URL the file bytes come from.
    gets = [r for r in hub.requests if r.path.startswith("/_content/")]
    assert gets and not any(r.authorization for r in gets)
    assert all(r.authorization for r in hub.requests if not r.path.startswith("/_content/"))


# ------------------------------------------------------------------------------ offline


def test_offline_uses_the_cache_without_the_network(hub, monkeypatch):
    pulled = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    hub.clear_requests()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull.resolve_local(f"{REPO}:Q4_K_M", pull_if_missing=True) == pulled
    assert pull.pull(f"{REPO}:Q4_K_M") == pulled
    assert hub.requests == []


def test_offline_without_the_files_says_what_is_missing(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.OfflineError, match=r"acme/Tiny-GGUF:Q8_0 is not in the cache"):
        pull.resolve_local(f"{REPO}:Q8_0", pull_if_missing=True)
    assert hub.requests == []


def test_offline_with_half_a_split_model_says_so(hub, monkeypatch):
    def interrupt(p: transfer.PullProgress) -> None:
        if p.file_index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull.pull(REPO, "Q8_0", on_progress=interrupt, retry=FAST)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.OfflineError, match=r"partly downloaded \(1 of 2 files"):
        pull.resolve_local(f"{REPO}:Q8_0", pull_if_missing=True)


def test_unreachable_hub_falls_back_to_the_cache(hub, monkeypatch):
    pulled = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    hub.stop()
    assert pull.resolve_local(f"{REPO}:Q4_K_M", pull_if_missing=True) == pulled
    assert pull.pull(f"{REPO}:Q4_K_M", retry=FAST) == pulled
    with pytest.raises(session.HubUnreachableError, match="cannot reach the hub"):
        pull.resolve_local(f"{REPO}:Q8_0", pull_if_missing=True)


def test_resolve_local_without_pulling_names_the_command(hub):
    with pytest.raises(errors.ModelNotFoundError, match="not downloaded") as info:
        pull.resolve_local(f"{REPO}:Q4_K_M", pull_if_missing=False)
    assert "qwenrun pull acme/Tiny-GGUF:Q4_K_M" in (info.value.hint or "")
    assert hub.requests == []


def test_confirm_can_decline_before_any_byte(hub):
    seen: list[listing.PullTarget] = []

    def decline(t: listing.PullTarget) -> bool:
        seen.append(t)
        return False

    with pytest.raises(errors.Declined, match="Not downloading") as info:
        pull.resolve_local(REPO, pull_if_missing=True, confirm=decline)
    assert not isinstance(info.value, errors.UsageError)  # a choice, not a mistake
    (target,) = seen
    assert target.quant.quant == "Q4_K_M"  # the stand-in's 4-bit default
    assert target.total_size == hub.file(REPO, SINGLE).size
    assert content_gets(hub, SINGLE) == []


# ------------------------------------------------------------------------------ removal


def test_removal_frees_the_quant_and_keeps_the_others(hub):
    pull.pull(REPO, "Q8_0", retry=FAST)
    pull.pull(REPO, "Q4_K_M", retry=FAST)
    (q8,) = [c for c in cache.cached_quants() if c.quant == "Q8_0"]
    removal = cache.plan_removal([q8])
    assert removal.freed_bytes == sum(hub.file(REPO, s).size for s in SHARDS)
    removal.execute()
    assert [c.quant for c in cache.cached_quants()] == ["Q4_K_M"]
    assert not scan_cache_dir(cache_dir()).warnings


@pytest.mark.slow
def test_removal_never_touches_another_repo_with_the_same_commit(hub):
    # The loopback hub's commit is a hash of the files: repos with the same files share it.
    # Real commits are unique, but a deletion must not depend on that. (huggingface_hub's
    # delete_revisions takes bare hashes and picks whichever repo comes first in a set.)
    files = {p: f.source or f.data or b"" for p, f in hub.repos[REPO].files.items()}
    repos = [REPO, *(f"acme/Other{k}-GGUF" for k in range(1, 6))]
    for repo in repos[1:]:
        assert hub.add_repo(repo, files) == hub.repos[REPO].commit
    for repo in repos:
        pull.pull(repo, "Q4_K_M", retry=FAST)
    pull.pull(REPO, "Q8_0", retry=FAST)

    def complete() -> set[tuple[str, str]]:
        return {(c.repo, c.quant) for c in cache.cached_quants() if c.complete}

    def remove(repo: str, quant: str) -> None:
        (cq,) = [c for c in cache.cached_quants() if (c.repo, c.quant) == (repo, quant)]
        cache.plan_removal([cq]).execute()

    left = {(r, "Q4_K_M") for r in repos} | {(REPO, "Q8_0")}
    for repo in [*repos, REPO]:
        quant = "Q8_0" if (repo, "Q4_K_M") not in left else "Q4_K_M"
        remove(repo, quant)
        left.discard((repo, quant))
        assert complete() == left
        for other in {r for r, _ in left}:
            folder = cache_dir() / ("models--" + other.replace("/", "--"))
            assert (folder / "refs" / "main").read_text() == hub.repos[other].commit
        assert not scan_cache_dir(cache_dir()).warnings
    # A repo's last quant takes its folder with it: no empty models--… folder is left.
    assert not [p.name for p in cache_dir().glob("models--*")]


def test_local_split_file_brings_its_shards(tiny_models):
    first = tiny_models("qwen3moe", split=2)
    paths = pull.resolve_local(str(first), pull_if_missing=False)
    assert [p.name for p in paths] == [
        first.name,
        first.name.replace("-00001-of-", "-00002-of-"),
    ]


@pytest.mark.slow
def test_catalog_model_is_found_in_its_next_repo(monkeypatch, tiny_models):
    from qwenrun import catalog

    spec = next(s for s in catalog.CATALOG if len(s.repos) >= 2)
    model = tiny_models("qwen3moe")
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        # The preferred repo is missing altogether: the next one serves.
        server.add_repo(spec.repos[1], {f"{spec.display}-Q4_K_M.gguf": model})
        (path,) = pull.pull(f"{spec.name}:Q4_K_M", retry=FAST)
        assert f"models--{spec.repos[1].replace('/', '--')}" in str(path)
        # The preferred repo exists but lacks the quant: still the next one.
        server.add_repo(spec.repos[0], {f"{spec.display}-Q8_0.gguf": model})
        target = listing.plan_pull(refs.parse_ref(f"{spec.name}:Q4_K_M"))
        assert target.repo == spec.repos[1]
        # No quant named: the preferred repo's own choice wins.
        assert listing.plan_pull(refs.parse_ref(spec.name)).repo == spec.repos[0]
        with pytest.raises(errors.ModelNotFoundError, match="no quant Q2_K") as info:
            listing.plan_pull(refs.parse_ref(f"{spec.name}:Q2_K"))
        assert "Q4_K_M" in (info.value.hint or "") and "Q8_0" in (info.value.hint or "")


@pytest.mark.parametrize("etag", ["../../../evil", "a/b", ".."])
def test_hostile_etag_never_names_a_blob(hub, etag):
    hub.advertise_sha256(REPO, SINGLE, etag)
    with pytest.raises(errors.DownloadError, match="no usable ETag"):
        pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
    assert content_gets(hub, SINGLE) == []
    assert not list(cache_dir().parent.rglob("evil*"))


def test_hub_without_storage_redirect(monkeypatch, tiny_models):
    """Some mirrors serve the bytes from `resolve` itself: Range and resume work the same."""
    with HubServer(redirect=False) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_repo(REPO, {SINGLE: tiny_models("qwen3moe")})
        server.cut_after(REPO, SINGLE, 123_456, times=1)
        (path,) = pull.pull(f"{REPO}:Q4_K_M", retry=FAST)
        assert path.read_bytes() == server.file(REPO, SINGLE).source.read_bytes()
        gets = [r.range for r in server.requests_for(SINGLE, "GET")]
        assert gets == [None, "bytes=123456-"]


def test_notes_a_home_cannot_take_never_fail_a_command(tmp_path, monkeypatch):
    # QWENRUN_HOME names a file: verification and pull notes cannot be kept. That only means
    # hashing again next time; the files themselves are fine.
    home = tmp_path / "not-a-folder"
    home.write_text("x")
    monkeypatch.setenv("QWENRUN_HOME", str(home))
    blob = tmp_path / "blob"
    blob.write_bytes(b"data")
    cache.record_verified(blob, "0" * 64)
    assert not cache.is_verified(blob)
    cache.forget_verified(blob)
    cache.forget_pull("o/r", "Q4_K_M")
