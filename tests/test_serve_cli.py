"""`qwenrun serve`, `ps` and `run --server` as a user runs them: real processes on loopback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenrun.testing.proc import child_env, error_line, run_qwenrun

TIMEOUT = 120.0


class ServeProcess:
    """`qwenrun serve` in a child process; its stderr is read on a thread as it comes."""

    def __init__(self, *args: str, home: Path) -> None:
        # Its own QWENRUN_HOME and HF cache, never the user's (a module's server outlives
        # the per-test ones conftest sets).
        env = {"QWENRUN_HOME": str(home / "qwenrun-home"), "HF_HOME": str(home / "hf-home")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenrun", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(env),
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of stream
            self._changed.notify_all()

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first stderr line matching `pattern`, waiting for it to be written."""
        regex = re.compile(pattern)
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = regex.search(line)
                    if found:
                        return found
                seen = len(self.lines)
                if self.proc.poll() is not None and seen and self.lines[-1] == "":
                    raise AssertionError("serve ended:\n" + "\n".join(self.lines))
                if not self._changed.wait(TIMEOUT):
                    raise AssertionError("timed out:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory) -> Iterator[tuple[str, Path, ServeProcess]]:
    model = tiny_models("qwen3moe", steer=1)
    home = tmp_path_factory.mktemp("serve-home")
    serve = ServeProcess(str(model), "--port", "0", "--ctx", "1024", "--threads", "1", home=home)
    try:
        url = serve.wait_for(r"listening on (http://\S+)").group(1)
        serve.wait_for(r"ready: ")
        yield url, model, serve
    finally:
        serve.stop()


def test_serve_prints_the_plan_and_the_address(server):
    _url, model, serve = server
    serve.wait_for(r"context 1,024 tokens")
    serve.wait_for(rf"serves it as {re.escape(model.stem)}")


def test_run_through_the_server(server):
    url, model, serve = server
    proc = run_qwenrun("run", str(model), "hello", "--server", url, "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "\x1b[" not in proc.stdout
    serve.wait_for(r"POST /v1/chat/completions 200 .* → \d+ tokens")

    # QWENRUN_SERVER does the same; --json has the stats a local run has.
    env = {"QWENRUN_SERVER": url}
    proc = run_qwenrun("run", model.stem, "hello", "--json", "--max-tokens", "8", env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stats"]["generated_tokens"] <= 8
    assert doc["stats"]["prompt_tokens"] > 0
    assert doc["server"] == url


def test_run_with_another_model_or_load_flags_is_refused(server):
    url, _model, _serve = server
    proc = run_qwenrun("run", "qwen3-30b-a3b", "hi", "--server", url)
    assert "runs" in error_line(proc, 2)
    proc = run_qwenrun("run", "qwen3-30b-a3b", "hi", "--server", url, "--ctx", "4096")
    assert "--ctx" in error_line(proc, 2)


def test_run_without_a_server_there(tmp_path):
    proc = run_qwenrun("run", "x.gguf", "hi", "--server", "http://127.0.0.1:9")
    assert "no qwenrun server" in error_line(proc, 6)


def test_ps_shows_what_the_server_has_loaded(server):
    url, model, _serve = server
    proc = run_qwenrun("ps", "--server", url)
    assert proc.returncode == 0, proc.stderr
    assert model.stem in proc.stdout and "ready" in proc.stdout and "1,024" in proc.stdout
    doc = json.loads(run_qwenrun("ps", "--server", url, "--json").stdout)
    assert doc["models"][0]["qwenrun"]["n_ctx"] == 1024


def test_a_taken_port_is_a_one_line_error(server, tiny_models):
    url, model, _serve = server
    port = url.rsplit(":", 1)[1]
    proc = run_qwenrun("serve", str(model), "--port", port)
    assert "cannot listen" in error_line(proc, 2)


def test_ctrl_c_stops_the_server_cleanly(tiny_models, tmp_path):
    model = str(tiny_models("qwen3moe", steer=1))
    serve = ServeProcess(model, "--port", "0", "--ctx", "512", home=tmp_path)
    serve.wait_for(r"ready: ")
    assert serve.stop() == 0
    assert "stopped" in serve.lines[-2]
    assert not any("Traceback" in line for line in serve.lines)
