"""`qwenrun serve`, `ps` and `run --server` as a user runs them: real processes on loopback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
        except subprocess.TimeoutExpired:
            # What the server said is what tells why it did not stop.
            raise AssertionError("did not stop:\n" + "\n".join(self.lines)) from None
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


@pytest.mark.slow
def test_serve_prints_the_plan_and_the_address(server):
    _url, model, serve = server
    serve.wait_for(r"context 1,024 tokens")
    serve.wait_for(rf"serves it as {re.escape(model.stem)}")


@pytest.mark.slow
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


@pytest.mark.slow
def test_run_with_another_model_or_load_flags_is_refused(server):
    url, _model, _serve = server
    proc = run_qwenrun("run", "qwen3-30b-a3b", "hi", "--server", url)
    assert "runs" in error_line(proc, 2)
    proc = run_qwenrun("run", "qwen3-30b-a3b", "hi", "--server", url, "--ctx", "4096")
    assert "--ctx" in error_line(proc, 2)


@pytest.mark.slow
def test_run_without_a_server_there(tmp_path):
    proc = run_qwenrun("run", "x.gguf", "hi", "--server", "http://127.0.0.1:9")
    assert "no qwenrun server" in error_line(proc, 6)


@pytest.mark.slow
def test_ps_shows_what_the_server_has_loaded(server):
    url, model, _serve = server
    proc = run_qwenrun("ps", "--server", url)
    assert proc.returncode == 0, proc.stderr
    assert model.stem in proc.stdout and "ready" in proc.stdout and "1,024" in proc.stdout
    doc = json.loads(run_qwenrun("ps", "--server", url, "--json").stdout)
    assert doc["models"][0]["qwenrun"]["n_ctx"] == 1024
    # $QWENRUN_SERVER names the server, as for run and chat.
    proc = run_qwenrun("ps", "--json", env={"QWENRUN_SERVER": url})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["server"] == url


@pytest.mark.slow
def test_a_taken_port_is_a_one_line_error(server, tiny_models):
    url, model, _serve = server
    port = url.rsplit(":", 1)[1]
    proc = run_qwenrun("serve", str(model), "--port", port)
    assert "cannot listen" in error_line(proc, 2)


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(tiny_models, tmp_path):
    model = str(tiny_models("qwen3moe", steer=1))
    serve = ServeProcess(model, "--port", "0", "--ctx", "512", home=tmp_path)
    serve.wait_for(r"ready: ")
    assert serve.stop() == 0
    assert "stopped" in serve.lines[-2]
    assert not any("Traceback" in line for line in serve.lines)


# ---- a server that stops mid-answer, and the server's own words (issue 19)


def _card(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/v1/models", timeout=TIMEOUT) as resp:
        return dict(json.load(resp)["data"][0])


def _until(found: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not found():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _run_in_background(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qwenrun", "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


@pytest.mark.slow
def test_run_says_in_one_line_that_the_server_stopped_mid_answer(tiny_models, tmp_path):
    model = tiny_models("qwen3moe", steer=2)  # never stops by itself
    serve = ServeProcess(
        str(model), "--port", "0", "--ctx", "16384", "--threads", "1", home=tmp_path
    )
    try:
        url = serve.wait_for(r"listening on (http://\S+)").group(1)
        serve.wait_for(r"ready: ")
        asked = (model.stem, "a long answer", "--server", url, "--max-tokens", "15000")
        answering = _run_in_background(*asked)
        _until(lambda: _card(url)["qwenrun"]["busy"])
        waiting = _run_in_background(*asked, "--json")
        _until(lambda: _card(url)["qwenrun"]["waiting"] == 1)
        serve.proc.send_signal(signal.SIGTERM)  # a service manager's stop
        assert serve.proc.wait(TIMEOUT) == 0
        out, err = answering.communicate(timeout=TIMEOUT)
        json_out, _ = waiting.communicate(timeout=TIMEOUT)
    finally:
        serve.stop()
    # Exit 6 (BackendError), as for no server at all: not 130, which would say the user
    # pressed Ctrl-C; what had come stays printed, and one line says the answer is cut.
    fake = subprocess.CompletedProcess(asked, answering.returncode, out, err)
    assert "stopped before the answer was complete" in error_line(fake, 6)
    assert out.strip()
    # --json: one object on stdout all the same, the error with its exit code.
    assert waiting.returncode == 6
    doc = json.loads(json_out)
    assert doc["error"]["code"] == 6 and "stopping" in doc["error"]["message"]
    # The server wrote a line for each: the cut answer and the request it did not start.
    serve.wait_for(r"POST /v1/chat/completions 200 .* cut off: the server is stopping")
    serve.wait_for(r"POST /v1/chat/completions 503 ")
    assert not any("Traceback" in line for line in serve.lines)


@pytest.mark.parametrize("port", ["70000", "-1"])
@pytest.mark.slow
def test_serve_refuses_a_port_out_of_range(tiny_models, port):
    # Before: 70000 listened on 4464 (the socket layer wraps it), -1 said "Servname not
    # supported for ai_socktype".
    proc = run_qwenrun("serve", str(tiny_models("qwen3moe", steer=1)), "--port", port, timeout=60)
    line = error_line(proc, 2)
    assert f"--port {port}" in line and "65535" in line


@pytest.mark.slow
def test_serve_refuses_an_empty_api_key(tiny_models):
    # `--api-key "$KEY"` with KEY unset: a key was meant, so no silent keyless server.
    model = str(tiny_models("qwen3moe", steer=1))
    proc = run_qwenrun("serve", model, "--port", "0", "--api-key", "", timeout=60)
    assert "--api-key" in error_line(proc, 2)


@pytest.mark.slow
def test_serve_on_every_interface_says_where_it_listens(tiny_models, tmp_path):
    model = str(tiny_models("qwen3moe", steer=1))
    serve = ServeProcess(
        model, "--host", "0.0.0.0", "--port", "0", "--api-key", "s3cret", home=tmp_path
    )
    try:
        found = serve.wait_for(
            r"listening on http://0\.0\.0\.0:(\d+), every interface "
            r"\(OpenAI API: http://127\.0\.0\.1:(\d+)/v1 here"
        )
        assert found.group(1) == found.group(2)
        serve.wait_for(r"ready: ")
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/health") as resp:
            assert json.load(resp)["status"] == "ready"
    finally:
        serve.stop()


@pytest.mark.slow
def test_the_model_id_is_the_same_while_loading_and_once_ready(tiny_models, tmp_path):
    model = tiny_models("qwen3moe", steer=1)
    serve = ServeProcess(str(model), "--port", "0", "--ctx", "1024", home=tmp_path)
    seen: list[tuple[str, str]] = []
    try:
        url = serve.wait_for(r"listening on (http://\S+)").group(1)
        # From the first answer on: the start-up (machine, plan, load) takes a moment.
        while not seen or seen[-1][0] != "ready":
            card = _card(url)
            seen.append((card["qwenrun"]["status"], card["id"]))
    finally:
        serve.stop()
    assert seen[0][0] == "loading"  # caught while it loads
    assert {model_id for _, model_id in seen} == {model.stem}


@pytest.mark.slow
def test_ps_without_a_server_says_how_to_start_one():
    proc = run_qwenrun("ps", "--server", "http://127.0.0.1:9")
    line = error_line(proc, 6)
    assert "no qwenrun server" in line and "qwenrun serve" in line
    assert "leave --server out" not in line  # that is `run`'s and `chat`'s way, not ps's
