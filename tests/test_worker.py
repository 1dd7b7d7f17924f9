"""`qwenrun worker` as a real process: what it says, how it stops, what it refuses, its cache."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from qwenrun.engine import rpc
from qwenrun.synthetic.tiny_gguf import QWEN_VOCAB_SIZE
from qwenrun.testing.proc import error_line, run_qwenrun
from qwenrun.testing.workers import READY, free_port, run_client, start_worker

pytestmark = pytest.mark.slow


def test_it_says_where_it_serves_what_and_how_to_use_it():
    worker = start_worker("--threads", "1")
    try:
        out = "\n".join(worker.out)
        assert f"{READY} {worker.endpoint} (RPC protocol 7.0.0)" in out
        # Its one device here is the CPU: served as device 0, with the machine's RAM.
        (cpu,) = [ln for ln in worker.out if ln.strip().startswith(worker.buffer(0))]
        assert " CPU · " in cpu and "RAM " in cpu and "GiB" in cpu
        home = Path(os.environ["QWENRUN_HOME"])
        assert f"weights cache: {home / 'rpc-cache'}" in out
        assert f"--rpc {worker.endpoint}" in out
        assert worker.err == []  # loopback: no warning
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_it_cleanly(signum):
    worker = start_worker("--no-cache")
    assert "  weights cache: off" in worker.out
    # SIGINT straight to the serving process, as a terminal's Ctrl-C reaches it; SIGTERM to
    # qwenrun's own process, as `kill` or a service manager sends it.
    if signum == signal.SIGINT:
        worker.server().send_signal(signum)
        assert worker.proc.wait(timeout=30) == 0
    else:
        assert worker.stop(signum) == 0
    assert worker.out[-1] == "qwenrun worker: stopped"
    assert not [ln for ln in worker.err if ln.strip()]  # no traceback, no message


def test_a_busy_port_is_one_line():
    worker = start_worker("--no-cache")
    try:
        proc = run_qwenrun("worker", "--port", str(worker.port), timeout=60)
        line = error_line(proc, rpc.LOST_EXIT_CODE)
        assert f"port {worker.port} on 127.0.0.1 is already in use" in line
        assert "--port" in line
    finally:
        worker.stop()


def test_a_host_that_is_not_an_ipv4_address_is_refused():
    proc = run_qwenrun("worker", "--host", "localhost", "--port", str(free_port()))
    assert "is not an IPv4 address" in error_line(proc, 2)


def test_listening_beyond_loopback_warns_that_there_is_no_authentication():
    worker = start_worker("--host", "0.0.0.0", "--no-cache")
    try:
        warning = " ".join(worker.err)
        assert "no authentication" in warning
        assert f"ssh -N -L {worker.port}:127.0.0.1:{worker.port}" in warning
        assert f"--rpc 127.0.0.1:{worker.port}" in "\n".join(worker.out)
    finally:
        assert worker.stop() == 0


def test_a_second_load_takes_the_big_weights_from_the_cache(tiny_models, tmp_path):
    # The output layer of a 151,936-token vocabulary is 38.9 MB of f32: over ggml-rpc's 10 MiB
    # threshold, so the worker keeps it by hash and the next load does not send it again.
    cache = tmp_path / "cache"
    worker = start_worker("--cache", str(cache), "--threads", "1")
    model = str(tiny_models("qwen3moe", vocab_size=QWEN_VOCAB_SIZE))
    try:
        opts = {"model": model, "workers": worker.endpoint, "blocks": [[worker.buffer(), 4]]}
        first = run_client(tokens=8, **opts)
        assert first.returncode == 0, first.stderr
        _told(worker, 2)  # the first client's visit is over
        kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        assert len(kept) == 1 and all(len(name) == 16 for name in kept)  # a 64-bit FNV hash
        second = run_client(tokens=8, **opts)
        assert second.returncode == 0, second.stderr
        assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == kept
        assert json.loads(second.stdout)["text"] == json.loads(first.stdout)["text"]
        # Each client's visit is told once, not each of its many connections.
        told = [ln.split(" ", 1)[1] for ln in _told(worker, 4)]
        assert told[0::2] == ["a client connected"] * 2
        assert all(t.startswith("the client left after ") for t in told[1::2])
    finally:
        worker.stop()


def _told(worker, n: int, timeout: float = 30) -> list[str]:
    """The worker's first `n` timestamped lines (waiting for them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [ln for ln in worker.out if ln[:2].isdigit() and ln[2] == ":"]
        if len(lines) >= n:
            return lines[:n]
        time.sleep(0.05)
    raise AssertionError(f"the worker told only {worker.out}")
