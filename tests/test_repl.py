"""`qwenrun chat` as a user meets it: a real pseudo-terminal (pexpect), and pipes.

Every test runs the real CLI in its own process on a generated tiny model (steer=2: it never
stops by itself, so answers last exactly --max-tokens tokens and Ctrl-C has time to land).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from qwenrun.testing.proc import child_env

PROMPT = ">>> "
TIMEOUT = 60


def env() -> dict[str, str]:
    # A pty under test answers no cursor-position queries; tell prompt_toolkit not to ask.
    return child_env({"TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"})


def spawn(model: Path, *args: str, cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenrun", "chat", str(model), "--seed", "1", *args],
        env=env(),
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
        child.expect(r"context\s+\d+ of \d+ tokens in use · 2 turns")
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


# ---- pipes


def chat_piped(model: Path, lines: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", str(model), "--seed", "1", *args],
        input=lines.encode(),
        capture_output=True,
        env=env(),
        cwd=str(cwd),
        timeout=TIMEOUT,
    )
    # Decoded by hand: text mode would turn a "\r" of the random answers into "\n".
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


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


def test_bad_option_is_a_one_line_usage_error(model, tmp_path):
    proc = chat_piped(model, "hello\n", "--budget", "-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --budget") and len(proc.stderr.splitlines()) == 1
    assert proc.stdout == ""
