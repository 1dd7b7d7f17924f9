"""Text that enters from the command line, and output that cannot leave: real processes.

Bytes that are not UTF-8 (on stdin, in arguments, in a transcript's JSON escapes) become U+FFFD
with one notice (`qwenrun.text`); a stdout that cannot be written is one line and a non-zero
exit; a script that asked for `--json` gets its failure as JSON on stdout too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenrun.testing.proc import child_env, error_line, run_qwenrun

pytestmark = pytest.mark.slow

TIMEOUT = 120
SMALL = ("--max-tokens", "4", "--seed", "1", "--ctx", "512")


def qwenrun_bytes(
    *args: str | bytes, stdin: bytes = b"", cwd: Path | None = None, **popen: object
) -> subprocess.CompletedProcess[str]:
    """`qwenrun ARGS…` with raw bytes on stdin and in the arguments, as a shell passes them."""
    kw: dict[str, object] = {"capture_output": True, **popen}
    if "stdout" in popen:
        kw = {"stderr": subprocess.PIPE, **popen}
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", *args],
        input=stdin,
        env=child_env(),
        cwd=cwd,
        timeout=TIMEOUT,
        **kw,  # type: ignore[arg-type]
    )
    # Decoded by hand: the answers of a random model may hold any bytes.
    out = proc.stdout.decode("utf-8", "replace") if proc.stdout else ""
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, out, proc.stderr.decode("utf-8", "replace")
    )


@pytest.fixture
def model(tiny_models) -> str:
    return str(tiny_models("qwen3moe", steer=2))


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "a bug in qwenrun" not in proc.stderr, proc.stderr


# ---- bytes that are not UTF-8


def test_latin1_on_stdin_is_replaced_and_said_once(model):
    proc = qwenrun_bytes("run", model, *SMALL, stdin=b"caf\xe9\n")
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stderr.count("1 byte of the prompt was not UTF-8 (each is now \ufffd)") == 1


def test_bad_bytes_in_the_prompt_argument_and_the_system_prompt(model):
    proc = qwenrun_bytes(
        "run", model, b"x\xff\xfe", "--system", b"s\xe9", *SMALL, "--json", stdin=b""
    )
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["generated_tokens"] == 4
    assert "2 bytes of the prompt were not UTF-8" in proc.stderr
    assert "1 byte of the system prompt was not UTF-8" in proc.stderr


def test_piped_chat_keeps_the_conversation_after_a_line_that_is_not_utf8(model, tmp_path):
    lines = b"caf\xe9\nsecond\n/save t.json\n"
    proc = qwenrun_bytes("chat", model, *SMALL, stdin=lines, cwd=tmp_path)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "1 byte of the message was not UTF-8" in proc.stderr
    doc = json.loads((tmp_path / "t.json").read_text("utf-8"))
    users = [m["content"] for m in doc["messages"] if m["role"] == "user"]
    assert users == ["caf\ufffd", "second"]


def test_a_transcript_with_a_lone_surrogate_is_cleaned_at_load_and_the_chat_goes_on(
    model, tmp_path
):
    # JSON's "\ud800" escape: valid JSON, not valid Unicode.
    (tmp_path / "odd.json").write_text(
        '{"messages": [{"role": "user", "content": "a\\ud800b"},'
        ' {"role": "assistant", "content": "ok"}]}',
        "utf-8",
    )
    lines = b"/load odd.json\nnext question\n/save after.json\n"
    proc = qwenrun_bytes("chat", model, *SMALL, stdin=lines, cwd=tmp_path)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "Loaded 1 turn" in proc.stderr
    assert "1 byte of the transcript was not UTF-8 (each is now \ufffd)" in proc.stderr
    doc = json.loads((tmp_path / "after.json").read_text("utf-8"))
    users = [m["content"] for m in doc["messages"] if m["role"] == "user"]
    assert users == ["a\ufffdb", "next question"]


def test_a_transcript_with_a_number_too_long_to_read_is_one_line(model, tmp_path):
    # Python refuses integers of more than 4,300 digits (a ValueError, not a JSONDecodeError).
    (tmp_path / "long.json").write_text('{"budget": 1' + "0" * 100_000 + ', "messages": []}')
    proc = qwenrun_bytes("chat", model, *SMALL, stdin=b"/load long.json\n", cwd=tmp_path)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "long.json is not a qwenrun transcript: it holds a number with too many digits" in (
        proc.stderr
    )


# ---- output that cannot be written


@pytest.mark.parametrize(
    "args",
    [("run", "{model}", "hi", *SMALL), ("list", "--json"), ("plan", "{model}", "--json")],
    ids=["run", "list", "plan"],
)
def test_a_full_stdout_is_one_line_and_a_failure(model, args):
    with open("/dev/full", "w") as full:
        proc = qwenrun_bytes(*(a.format(model=model) for a in args), stdout=full)
    _no_traceback(proc)
    line = error_line(proc, 1)
    assert line.startswith("error: cannot write the output: no space left on device")


def test_a_closed_stdout_is_one_line_and_a_failure(model):
    # `qwenrun list --json >&-`: Python then has no sys.stdout at all; printing to it used to
    # succeed silently (exit 0, nothing written).
    proc = qwenrun_bytes(
        "list", "--json", stdout=None, preexec_fn=lambda: os.close(1), close_fds=False
    )
    _no_traceback(proc)
    assert "cannot write the output: stdout is closed" in error_line(proc, 1)


# ---- --json failures as JSON


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (("run", "{missing}", "hi", "--json"), 3, "no such file"),
        (("plan", "qwen9-moe", "--json"), 3, "qwen9-moe"),
        (("bench", "{missing}", "--json"), 3, "no such file"),
        (("plan", "{model}", "--ctx", "5", "--json"), 2, "--ctx 5"),
    ],
    ids=["run", "plan", "bench", "usage"],
)
def test_json_failures_are_json_on_stdout_and_one_line_on_stderr(model, tmp_path, args, code, said):
    missing = str(tmp_path / "missing.gguf")
    proc = run_qwenrun(*(a.format(model=model, missing=missing) for a in args))
    line = error_line(proc, code)
    doc = json.loads(proc.stdout)
    assert set(doc) == {"error"}
    assert doc["error"]["code"] == code
    assert said in doc["error"]["message"]
    assert line.startswith(f"error: {doc['error']['message']}")
    assert set(doc["error"]) == {"message", "hint", "code"}


def test_without_json_a_failure_leaves_stdout_empty(tmp_path):
    proc = run_qwenrun("run", str(tmp_path / "missing.gguf"), "hi")
    error_line(proc, 3)
    assert proc.stdout == ""
