"""`qwenrun chat` as a user meets it: a real pseudo-terminal (pexpect), and pipes.

Every test runs the real CLI in its own process on a generated tiny model (steer=2: it never
stops by itself, so answers last exactly --max-tokens tokens and Ctrl-C has time to land);
the one whose answer depends on the machine runs the same start-up (`launch.start`) in-process
on a hypothetical machine.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from qwenrun import launch
from qwenrun.offload import Wishes
from qwenrun.testing.hardware import machine
from qwenrun.testing.hub_server import HubServer
from qwenrun.testing.proc import child_env, error_line, run_qwenrun

PROMPT = ">>> "
TIMEOUT = 60


def env(**extra: str) -> dict[str, str]:
    # A pty under test answers no cursor-position queries; tell prompt_toolkit not to ask.
    return child_env({"TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1", **extra})


def spawn(model: Path, *args: str, cwd: Path, **extra_env: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenrun", "chat", str(model), "--seed", "1", *args],
        env=env(**extra_env),
        cwd=str(cwd),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 120),
    )
    child.expect_exact(PROMPT)
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@pytest.fixture
def model(tiny_models) -> Path:
    return tiny_models("qwen3moe", steer=2)


@pytest.mark.slow
def test_a_session_with_modes_stats_save_and_load(model, tmp_path):
    child = spawn(model, "--max-tokens", "12", cwd=tmp_path)
    try:
        child.sendline("hello")
        # The answer streams, then the stats line, then the prompt again.
        child.expect(r"decode [\d.]+ tok/s · 12 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/nothink")
        child.expect_exact("Direct mode")
        child.expect_exact(PROMPT)
        child.sendline("second question")
        child.expect(r"12 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"mode\s+direct")
        child.expect_exact("2 answers")
        child.expect_exact(PROMPT)
        child.sendline("/save chat.json")
        child.expect_exact("Saved 2 turns")
        child.expect_exact(PROMPT)
        child.sendline("/clear")
        child.expect_exact("Conversation cleared.")
        child.expect_exact(PROMPT)
        child.sendline("/load chat.json")
        child.expect_exact("Loaded 2 turns")
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"context\s+[\d,]+ of [\d,]+ tokens before your next message · 2 turns")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)
    doc = json.loads((tmp_path / "chat.json").read_text("utf-8"))
    replies = [m for m in doc["messages"] if m["role"] == "assistant"]
    assert [m["mode"] for m in replies] == ["think", "direct"]
    assert [m["content"] for m in doc["messages"] if m["role"] == "user"] == [
        "hello",
        "second question",
    ]
    assert all(m["content"] for m in replies)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(model, tmp_path):
    child = spawn(model, "--max-tokens", "20000", "--ctx", "32768", cwd=tmp_path)
    try:
        child.sendline("tell me everything")
        # prompt_toolkit has let go of the terminal (bracketed paste off), and then some of
        # the answer has streamed: Ctrl-C is now a signal, not a key for the prompt.
        child.expect_exact("\x1b[?2004l")
        child.expect(r"\S{20}")
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)
        child.sendline("/set max-tokens 5")
        child.expect_exact(PROMPT)
        child.sendline("and now briefly")
        child.expect(r"5 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/save cut.json")
        child.expect_exact("Saved 2 turns")
        child.expect_exact(PROMPT)
        # Ctrl-C at the prompt explains how to leave; Ctrl-D leaves.
        child.sendintr()
        child.expect_exact("Use /exit, /bye or Ctrl-D to leave.")
        child.expect_exact(PROMPT)
        child.sendeof()
        assert finish(child) == 0
    finally:
        child.terminate(force=True)
    doc = json.loads((tmp_path / "cut.json").read_text("utf-8"))
    first, second = (m for m in doc["messages"] if m["role"] == "assistant")
    assert first.get("cut") is True and first["content"]
    assert "cut" not in second


@pytest.mark.slow
def test_ctrl_c_as_the_answer_starts_stops_it_on_a_terminal_that_ignores_cursor_queries(
    model, tmp_path
):
    # No PROMPT_TOOLKIT_NO_CPR: a pty answers no cursor-position request, as many terminals
    # do not. prompt_toolkit used to hold such a terminal raw for a second after Enter, so a
    # Ctrl-C typed as the answer started was a key, not a signal: the answer ran on and the
    # Ctrl-C surfaced at the next prompt as "Use /exit…".
    seen = io.StringIO()
    args = ["chat", str(model), "--seed", "1", "--max-tokens", "20000", "--ctx", "32768"]
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenrun", *args],
        env=child_env({"TERM": "xterm"}),
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 120),
    )
    child.logfile_read = seen
    try:
        child.expect_exact(PROMPT)
        for question in ("tell me everything", "and everything else"):
            child.sendline(question)
            child.expect_exact("\x1b[?2004l")  # the line is sent: prompt_toolkit is done
            time.sleep(0.3)  # well inside the second it used to keep the keyboard
            child.sendintr()
            child.expect_exact("[stopped]", timeout=20)
            child.expect_exact(PROMPT)
        child.sendeof()
        assert finish(child) == 0
    finally:
        child.terminate(force=True)
    assert "Use /exit" not in seen.getvalue()
    assert "cursor position requests" not in seen.getvalue()  # prompt_toolkit's warning


@pytest.mark.slow
def test_multi_line_input_with_alt_enter_and_triple_quotes(model, tmp_path):
    child = spawn(model, "--max-tokens", "4", cwd=tmp_path)
    try:
        child.send("line one")
        child.send("\x1b\r")  # Alt+Enter (Esc, Enter): a new line, not sent
        child.send("line two\r")
        child.expect(r"4 tokens")
        child.expect_exact(PROMPT)
        child.send('"""block start\r')
        child.send("middle\r")
        child.send('end"""\r')
        child.expect(r"4 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/save multi.json")
        child.expect_exact("Saved 2 turns")
        child.sendline("/bye")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)
    doc = json.loads((tmp_path / "multi.json").read_text("utf-8"))
    users = [m["content"] for m in doc["messages"] if m["role"] == "user"]
    assert users == ["line one\nline two", "block start\nmiddle\nend"]


@pytest.mark.slow
def test_thinking_is_folded_to_one_line_on_a_terminal(tiny_models, tmp_path):
    model = tiny_models("qwen3moe", steer=2, chat_template="qwen3.5", name="t-qwen3.5")
    child = spawn(model, "--max-tokens", "300", "--budget", "40", cwd=tmp_path)
    try:
        child.sendline("think first")
        child.expect_exact("Thinking")
        # 40 tokens of budget, then Qwen's wrap-up sentence (about a token per byte here).
        child.expect(r"Thought for \d+\.\d s · (\d+) tokens")
        assert 40 <= int(child.match.group(1)) <= 200
        child.expect(r"300 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)


@pytest.mark.slow
def test_history_persists_under_the_qwenrun_home(model, tmp_path):
    child = spawn(model, "--max-tokens", "3", cwd=tmp_path)
    try:
        child.sendline("remember this line")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)
    history = Path(os.environ["QWENRUN_HOME"]) / "history"
    assert "remember this line" in history.read_text("utf-8")


@pytest.mark.slow
def test_a_qwenrun_home_that_is_a_file_turns_history_off_and_the_chat_works(model, tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("not a folder")
    child = spawn(model, "--max-tokens", "3", cwd=tmp_path, QWENRUN_HOME=str(home))
    try:
        assert f"History is off: {home} is a file, not a folder" in child.before
        child.sendline("hello")
        child.expect(r"3 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        assert finish(child) == 0
        said = child.before or ""
    finally:
        child.terminate(force=True)
    assert "Traceback" not in said and "History is off" not in said  # said once, at the start
    assert home.read_text() == "not a folder"


@pytest.mark.slow
def test_history_that_fails_midway_turns_off_once_and_the_chat_goes_on(model, tmp_path):
    child = spawn(model, "--max-tokens", "3", cwd=tmp_path)
    try:
        child.sendline("kept")
        child.expect(r"3 tokens")
        child.expect_exact(PROMPT)
        # The history file turns into a folder under the session's feet.
        history = Path(os.environ["QWENRUN_HOME"]) / "history"
        history.unlink()
        history.mkdir()
        child.sendline("not kept")
        child.expect(r"3 tokens")
        child.expect_exact(f"History is off: cannot write {history}")
        child.expect_exact(PROMPT)
        child.sendline("still here")
        child.expect(r"3 tokens")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        assert finish(child) == 0
        assert "History is off" not in (child.before or "")
    finally:
        child.terminate(force=True)


# ---- pipes


def chat_piped(
    model: Path, lines: str, *args: str, cwd: Path, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", str(model), "--seed", "1", *args],
        input=lines.encode(),
        capture_output=True,
        env=env(**extra_env),
        cwd=str(cwd),
        timeout=TIMEOUT,
    )
    # Decoded by hand: text mode would turn a "\r" of the random answers into "\n".
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


@pytest.mark.slow
def test_piped_chat_prints_only_answers_on_stdout(model, tmp_path):
    proc = chat_piped(
        model, "hello\n/nothink\nsecond\n/save t.json\n", "--max-tokens", "10", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t.json").read_text("utf-8"))
    answers = [m["content"] for m in doc["messages"] if m["role"] == "assistant"]
    # stdout is the answers and nothing else: no banner, no stats, no escape codes.
    assert proc.stdout == "".join(a if a.endswith("\n") else a + "\n" for a in answers)
    assert "\x1b[" not in proc.stderr
    assert "Direct mode" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("show", [True, False])
def test_show_thinking_puts_thinking_on_stderr_only(tiny_models, tmp_path, show):
    # Qwen3.5's template opens <think>; the budget closes it, so both parts exist.
    model = tiny_models("qwen3moe", steer=2, chat_template="qwen3.5", name="t-qwen3.5")
    flag = "--show-thinking" if show else "--hide-thinking"
    proc = chat_piped(
        model, "hello\n/save t.json\n", "--max-tokens", "300", "--budget", "8", flag, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t.json").read_text("utf-8"))
    reply = doc["messages"][1]
    assert reply["thinking"] and reply["content"]
    assert reply["thinking"] not in proc.stdout
    assert "limited time" not in proc.stdout
    assert (reply["thinking"] in proc.stderr) is show
    assert proc.stdout.rstrip("\n") == reply["content"].rstrip("\n")


@pytest.mark.slow
def test_closed_stdout_ends_quietly(model, tmp_path):
    cmd = (
        f"printf 'hello\\n' | {sys.executable} -m qwenrun chat {model} --max-tokens 2000 "
        "--ctx 4096 | head -c 1 >/dev/null"
    )
    proc = subprocess.run(
        ["bash", "-c", cmd],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert "Traceback" not in proc.stderr
    assert "BrokenPipe" not in proc.stderr


@pytest.mark.slow
def test_bad_option_is_a_one_line_usage_error(model, tmp_path):
    proc = chat_piped(model, "hello\n", "--budget", "-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --budget") and len(proc.stderr.splitlines()) == 1
    assert proc.stdout == ""


@pytest.mark.slow
def test_failed_saves_and_loads_leave_the_session_and_the_conversation(model, tmp_path):
    (tmp_path / "model.gguf").write_text("a file, not a folder")
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "user"}]}')
    script = [
        "hello",
        "/save model.gguf/x.json",
        f"/save {tmp_path}",
        "/save missing/dir/x.json",
        "/save /proc/x.json",
        f"/load {tmp_path}",
        "/load bad.json",
        "/save kept.json",
    ]
    proc = chat_piped(model, "\n".join(script) + "\n", "--max-tokens", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for said in (
        "cannot save to model.gguf/x.json: model.gguf is a file, not a folder",
        f"cannot save to {tmp_path}: it is a folder",
        "cannot save to missing/dir/x.json: there is no folder missing",
        "cannot save to /proc/x.json",
        f"{tmp_path} is a folder, not a transcript",
        'bad.json: message 1 (user) has no "content" text',
        "Saved 1 turn to kept.json",
    ):
        assert said in proc.stderr
    assert not (tmp_path / "missing").exists()
    doc = json.loads((tmp_path / "kept.json").read_text("utf-8"))
    assert [m["content"] for m in doc["messages"] if m["role"] == "user"] == ["hello"]


@pytest.mark.slow
def test_piped_chat_needs_no_qwenrun_home(model, tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("not a folder")
    proc = chat_piped(model, "hello\n", "--max-tokens", "4", cwd=tmp_path, QWENRUN_HOME=str(home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
    assert "History" not in proc.stderr  # a pipe keeps no history: nothing to say


# ---- `qwenrun chat` with no model, when the hub is out of reach

CACHED = "tiny/offline-GGUF:Q4_K_M"


@pytest.fixture
def downloaded(tiny_models) -> Path:
    """A tiny model pulled into this test's HF cache: a model, but not the default one."""
    server = HubServer().start()
    try:
        server.add_repo("tiny/offline-GGUF", {"tiny-Q4_K_M.gguf": tiny_models("qwen3moe", steer=2)})
        proc = run_qwenrun("pull", CACHED, env={"HF_ENDPOINT": server.url})
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()
    return Path(proc.stdout.strip())


@pytest.mark.slow
def test_offline_chat_without_a_model_uses_a_downloaded_one(downloaded):
    proc = run_qwenrun("chat", "--max-tokens", "4", stdin="hello\n", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"offline (HF_HUB_OFFLINE is set): using {CACHED}, already downloaded" in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_offline_chat_with_nothing_downloaded_says_how_to_get_a_model():
    proc = run_qwenrun("chat", stdin="hello\n", env={"HF_HUB_OFFLINE": "1"})
    line = error_line(proc, 5)
    assert "offline (HF_HUB_OFFLINE is set), and no model is downloaded" in line
    assert "qwenrun pull " in line and "./model.gguf" in line


class Notices(launch.QuietHooks):
    def __init__(self) -> None:
        self.said: list[str] = []

    def notice(self, text: str) -> None:
        self.said.append(text)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_chat_without_a_model_uses_a_downloaded_one_when_the_hub_cannot_be_reached(
    downloaded, monkeypatch
):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    hooks = Notices()
    # A machine on which a catalog model is the default (and it is not downloaded).
    started = launch.start(None, Wishes(), hooks=hooks, hw=machine(None, 64))
    try:
        assert started.path == downloaded
        assert any(
            "cannot be reached: using " + CACHED in line and "instead of downloading" in line
            for line in hooks.said
        ), hooks.said
    finally:
        started.engine.close()
