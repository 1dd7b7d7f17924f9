"""`qwenrun pull`, `list` and `rm` as real processes against a loopback hub."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from huggingface_hub import hf_hub_download

from qwenrun import catalog
from qwenrun.testing.hub_server import HubServer
from qwenrun.testing.proc import child_env, error_line, run_qwenrun

SPEC = catalog.CATALOG[0]
REPO = SPEC.repos[0]
SINGLE = f"{SPEC.display}-Q4_K_M.gguf"
SHARDS = tuple(f"Q8_0/{SPEC.display}-Q8_0-0000{k}-of-00002.gguf" for k in (1, 2))
TOKEN = "hf_tEsTtOkEn0123456789"


@pytest.fixture
def hub(tiny_models) -> HubServer:
    single = tiny_models("qwen3moe", steer=2)
    first = tiny_models("qwen3moe", steer=2, split=2)
    second = first.with_name(first.name.replace("-00001-of-", "-00002-of-"))
    server = HubServer().start()
    server.add_repo(REPO, {SINGLE: single, SHARDS[0]: first, SHARDS[1]: second})
    yield server
    server.stop()


def qwenrun(hub: HubServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads HF_ENDPOINT at import: set it per process.
    return run_qwenrun(*args, env={"HF_ENDPOINT": hub.url, **env})


def one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    return error_line(proc, code, only=False)


def list_json(hub: HubServer) -> list[dict[str, object]]:
    proc = qwenrun(hub, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_answers(path: str) -> None:
    proc = run_qwenrun("run", path, "hi", "--max-tokens", "4", "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_pull_list_run_rm(hub):
    single = qwenrun(hub, "pull", f"{SPEC.name}:q4_k_m")
    assert single.returncode == 0, single.stderr
    (path,) = single.stdout.split()
    assert Path(path).read_bytes() == hub.file(REPO, SINGLE).source.read_bytes()
    assert f"{SPEC.name}:Q4_K_M" in single.stderr and "1.3 MB" in single.stderr

    split = qwenrun(hub, "pull", f"hf.co/{REPO}:Q8_0")
    assert split.returncode == 0, split.stderr
    shard_paths = split.stdout.split()
    assert [p.rsplit("/", 2)[-2:] for p in shard_paths] == [s.split("/") for s in SHARDS]
    run_answers(path)
    run_answers(shard_paths[0])

    listed = {e["quant"]: e for e in list_json(hub)}
    assert set(listed) == {"Q4_K_M", "Q8_0"}
    assert listed["Q8_0"]["reference"] == f"{SPEC.name}:Q8_0"
    assert listed["Q8_0"]["status"] == "complete" and listed["Q8_0"]["verified"] is True
    assert listed["Q8_0"]["path"] == shard_paths[0]
    assert listed["Q8_0"]["size_bytes"] == sum(hub.file(REPO, s).size for s in SHARDS)

    table = qwenrun(hub, "list")
    assert f"{SPEC.name}:Q4_K_M" in table.stdout and "complete" in table.stdout

    refused = qwenrun(hub, "rm", f"{SPEC.name}:Q8_0")
    assert "--yes" in one_error_line(refused, 2)
    removed = qwenrun(hub, "rm", f"{SPEC.name}:Q8_0", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "1.3 MB freed" in removed.stdout
    assert [e["quant"] for e in list_json(hub)] == ["Q4_K_M"]
    assert qwenrun(hub, "rm", SPEC.name, "--yes").returncode == 0
    assert list_json(hub) == []
    assert "not downloaded" in one_error_line(qwenrun(hub, "rm", SPEC.name, "--yes"), 3)


@pytest.mark.slow
def test_pull_without_quant_shows_the_choice(hub):
    proc = qwenrun(hub, "pull", SPEC.name)
    assert proc.returncode == 0, proc.stderr
    assert f"{SPEC.name}:Q4_K_M" in proc.stderr and REPO in proc.stderr
    again = qwenrun(hub, "pull", SPEC.name)
    assert "already downloaded" in again.stderr


@pytest.mark.slow
def test_cut_connection_resumes(hub):
    hub.cut_after(REPO, SINGLE, 500_000, times=1)
    proc = qwenrun(hub, "pull", f"{REPO}:Q4_K_M")
    assert proc.returncode == 0, proc.stderr
    ranges = [r.range for r in hub.requests_for(SINGLE, "GET")]
    assert ranges == [None, "bytes=500000-"]


@pytest.mark.slow
def test_wrong_sha256_is_refused_and_not_listed(hub):
    hub.advertise_sha256(REPO, SINGLE, "ab" * 32)
    line = one_error_line(qwenrun(hub, "pull", f"{REPO}:Q4_K_M"), 5)
    assert "failed its sha256 check" in line and "deleted" in line
    assert list_json(hub) == []
    offline = qwenrun(hub, "pull", f"{REPO}:Q4_K_M", HF_HUB_OFFLINE="1")
    assert "not in the cache" in one_error_line(offline, 5)


@pytest.mark.slow
def test_too_big_for_the_disk_is_refused_before_any_byte(hub):
    hub.advertise_size(REPO, SINGLE, 10**18)
    line = one_error_line(qwenrun(hub, "pull", f"{REPO}:Q4_K_M"), 5)
    assert "not enough disk space" in line and "still to download" in line and "free on" in line
    assert hub.requests_for(SINGLE, "GET") == []


@pytest.mark.slow
def test_token_needed_and_never_shown(hub):
    hub.token = TOKEN
    outputs = []
    without = qwenrun(hub, "pull", f"{REPO}:Q4_K_M")
    assert "HF_TOKEN" in one_error_line(without, 5)
    wrong = qwenrun(hub, "pull", f"{REPO}:Q4_K_M", HF_TOKEN=TOKEN[::-1])
    assert "token in HF_TOKEN" in one_error_line(wrong, 5)
    right = qwenrun(hub, "pull", f"{REPO}:Q4_K_M", HF_TOKEN=TOKEN)
    assert right.returncode == 0, right.stderr
    debug = qwenrun(hub, "pull", f"{REPO}:Q8_0", HF_TOKEN=TOKEN[::-1], QWENRUN_DEBUG="1")
    assert debug.returncode == 5
    outputs = [p.stdout + p.stderr for p in (without, wrong, right, debug)]
    assert not any(TOKEN in out or TOKEN[::-1] in out for out in outputs)


@pytest.mark.slow
def test_offline_after_pull_uses_the_cache(hub):
    pulled = qwenrun(hub, "pull", f"{REPO}:Q4_K_M")
    assert pulled.returncode == 0, pulled.stderr
    hub.clear_requests()
    offline = qwenrun(hub, "pull", f"{REPO}:Q4_K_M", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == pulled.stdout
    assert hub.requests == []
    run_answers(offline.stdout.strip())
    missing = qwenrun(hub, "pull", f"{REPO}:Q8_0", HF_HUB_OFFLINE="1")
    assert "offline" in one_error_line(missing, 5)


@pytest.mark.slow
def test_escaping_path_in_the_tree_is_refused(hub):
    hub.add_tree_entry(REPO, "../../../outside-Q4_K_M.gguf")
    line = one_error_line(qwenrun(hub, "pull", f"{REPO}:Q4_K_M"), 5)
    assert "outside the cache" in line


@pytest.mark.slow
def test_local_file_is_not_pulled(hub, tiny_models):
    line = one_error_line(qwenrun(hub, "pull", str(tiny_models("qwen3moe"))), 2)
    assert "nothing to download" in line


def spawn_tty(hub: HubServer, *args: str) -> pexpect.spawn:
    env = child_env({"HF_ENDPOINT": hub.url, "TERM": "xterm-256color"})
    return pexpect.spawn(
        sys.executable,
        ["-m", "qwenrun", *args],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(30, 140),
    )


@pytest.mark.slow
def test_terminal_asks_before_a_chosen_quant_and_draws_one_bar(hub):
    declined = spawn_tty(hub, "pull", SPEC.name)
    declined.expect_exact(f"{SPEC.name}:Q4_K_M")
    declined.expect_exact("Download it?")
    declined.sendline("n")
    declined.expect_exact("Not downloading")
    declined.expect(pexpect.EOF)
    declined.close()
    # Saying no is a choice, not an error: no "error:", exit 1 (as `rm -i` answered no).
    assert "error" not in (declined.before or "")
    assert declined.exitstatus == 1
    assert hub.requests_for(SINGLE, "GET") == []

    accepted = spawn_tty(hub, "pull", SPEC.name)
    accepted.expect_exact("Download it?")
    accepted.sendline("y")
    accepted.expect(r"downloading 1/1 .*MB")  # the bar: file k of n, bytes
    accepted.expect_exact("ready")
    accepted.expect(pexpect.EOF)
    accepted.close()
    assert accepted.exitstatus == 0
    assert [e["quant"] for e in list_json(hub)] == ["Q4_K_M"]


@pytest.mark.slow
def test_terminal_does_not_ask_for_a_named_quant_or_with_yes(hub):
    for args in (("pull", f"{SPEC.name}:Q8_0"), ("pull", SPEC.name, "--yes")):
        child = spawn_tty(hub, *args)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert "Download it?" not in (child.before or "")


# ---- run and chat take references: a missing model is pulled first, then planned and run


@pytest.mark.slow
def test_run_pulls_a_missing_reference_then_works_offline(hub):
    ref = f"{SPEC.name}:Q4_K_M"
    args = ("run", ref, "hello", "--max-tokens", "6", "--ctx", "512", "--seed", "1")
    first = qwenrun(hub, *args, "--yes", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["stats"]["generated_tokens"] == 6
    assert any(r["path"].endswith(SINGLE) for r in list_json(hub))
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith(SINGLE)]
    assert len(gets) == 1

    # Offline, the cached copy is used and nothing is asked of the hub.
    before = len(hub.requests)
    offline = qwenrun(hub, *args, "--json", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["answer"] == json.loads(first.stdout)["answer"]
    assert len(hub.requests) == before


@pytest.mark.slow
def test_run_refuses_a_file_whose_hash_is_wrong(hub):
    hub.advertise_sha256(REPO, SINGLE, "0" * 64)
    proc = qwenrun(hub, "run", f"{SPEC.name}:Q4_K_M", "hello", "--yes", "--ctx", "512")
    line = one_error_line(proc, 5)
    assert "sha256" in line or "hash" in line
    assert proc.stdout == ""
    assert not any(r["path"] and r["path"].endswith(SINGLE) for r in list_json(hub))


@pytest.mark.slow
def test_run_offline_without_the_files_says_what_is_missing(hub):
    proc = qwenrun(hub, "run", f"{SPEC.name}:Q4_K_M", "hello", HF_HUB_OFFLINE="1")
    line = one_error_line(proc, 5)
    assert "Q4_K_M" in line


# ---- only real work shows progress; a script is told what is fetched before the first byte


@pytest.mark.slow
def test_a_complete_model_shows_no_progress(hub):
    ref = f"{SPEC.name}:Q4_K_M"
    first = qwenrun(hub, "pull", ref)
    assert first.returncode == 0, first.stderr
    assert "downloading 1/1" in first.stderr
    again = qwenrun(hub, "pull", ref)
    assert again.returncode == 0, again.stderr
    assert "already downloaded" in again.stderr
    assert "downloading" not in again.stderr and "verifying" not in again.stderr
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        proc = qwenrun(hub, "run", ref, "hi", "--max-tokens", "2", "--ctx", "512", **env)
        assert proc.returncode == 0, proc.stderr
        assert "downloading" not in proc.stderr and "verifying" not in proc.stderr


@pytest.mark.slow
def test_a_cached_file_checked_for_the_first_time_says_verifying_once(hub):
    # Fetched by another tool: qwenrun hashes it once, and says only that.
    cache_dir = Path(os.environ["HF_HOME"]) / "hub"
    hf_hub_download(REPO, SINGLE, cache_dir=cache_dir, endpoint=hub.url)
    args = ("run", f"{REPO}:Q4_K_M", "hi", "--max-tokens", "2", "--ctx", "512")
    first = qwenrun(hub, *args)
    assert first.returncode == 0, first.stderr
    assert "verifying 1/1" in first.stderr and "downloading" not in first.stderr
    second = qwenrun(hub, *args)
    assert second.returncode == 0, second.stderr
    assert "verifying" not in second.stderr and "downloading" not in second.stderr


@pytest.mark.slow
def test_a_script_is_told_what_is_downloaded_and_its_size_first(hub):
    # No terminal, no --yes: qwenrun downloads (as Ollama and llama.cpp -hf do), after
    # saying on stderr what and how big.
    ref = f"{SPEC.name}:Q4_K_M"
    proc = qwenrun(hub, "run", ref, "hi", "--max-tokens", "2", "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    said = [i for i, ln in enumerate(lines) if ref in ln and REPO in ln and "1.3 MB" in ln]
    fetched = [i for i, ln in enumerate(lines) if ln.startswith("downloading")]
    assert said and fetched and said[0] < fetched[0], proc.stderr


# ---- a full disk


def qwenrun_with_file_limit(hub: HubServer, limit: int, *args: str) -> subprocess.CompletedProcess:
    """qwenrun in a child whose files cannot grow past `limit` bytes (RLIMIT_FSIZE).

    Past the limit, write() fails with EFBIG exactly where a full disk fails with ENOSPC (and
    a quota with EDQUOT), through the same code: a full disk without needing one. Python
    ignores SIGXFSZ, so the child sees the error rather than the signal.
    """

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "qwenrun", *args],
        capture_output=True,
        text=True,
        env=child_env({"HF_ENDPOINT": hub.url}),
        stdin=subprocess.DEVNULL,
        timeout=120,
        preexec_fn=limit_file_size,
    )


@pytest.mark.slow
def test_disk_full_during_a_pull_is_one_line_and_the_pull_resumes(hub):
    limit = 500_000
    ref = f"{REPO}:Q4_K_M"
    full = qwenrun_with_file_limit(hub, limit, "pull", ref)
    line = one_error_line(full, 5)
    assert len(full.stderr.strip().splitlines()) <= 3, full.stderr  # what, a progress line, why
    # How much is there, how much is missing, and what to do.
    assert "500.0 kB of 1.3 MB" in line and "839.0 kB still missing" in line, line
    assert "run the same command" in line
    (partial,) = (Path(os.environ["HF_HOME"]) / "hub").rglob("*.incomplete")
    assert partial.stat().st_size == limit  # kept for the next run

    hub.clear_requests()
    again = qwenrun(hub, "pull", ref)
    assert again.returncode == 0, again.stderr
    assert [r.range for r in hub.requests_for(SINGLE, "GET") if "/_content/" in r.path] == [
        f"bytes={limit}-"
    ]


# ---- any shard of a split model, and repos outside the catalog


@pytest.mark.slow
def test_run_takes_any_shard_of_a_split_model(tiny_models):
    first = tiny_models("qwen3moe", steer=2, split=2)
    run_answers(str(first.with_name(first.name.replace("-00001-of-", "-00002-of-"))))


@pytest.mark.slow
def test_a_repo_outside_the_catalog_gets_the_quant_its_real_headers_allow(hub, tiny_models):
    # Before: a fixed 4-bit default. Now: the planner's best over the files' real headers,
    # read with Range requests (Q8_0 fits a tiny model on any machine).
    repo = "tiny/outside-GGUF"
    model = tiny_models("qwen3moe", steer=2)
    hub.add_repo(repo, {"Outside-Q8_0.gguf": model, "Outside-Q4_K_M.gguf": model})
    proc = qwenrun(hub, "pull", repo)
    assert proc.returncode == 0, proc.stderr
    assert f"{repo}:Q8_0" in proc.stderr
    assert proc.stdout.strip().endswith("Outside-Q8_0.gguf")
    content = [r for r in hub.requests if r.method == "GET" and "/_content/" in r.path]
    header_reads = [r.range or "" for r in content if r.path.endswith("Q8_0.gguf")][:-1]
    assert header_reads and all(r.startswith("bytes=0-") for r in header_reads)
    assert not [r for r in content if r.path.endswith("Q4_K_M.gguf")]
