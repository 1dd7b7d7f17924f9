"""What the command line says, as a user reads it: real processes on generated models.

A quiet start (one line of facts; the plan's reasons with --verbose), help that uses the
terminal's width, the disk cache named as such, bench's progress, limits said alike in the
REPL and on the command line, and words that are true of the case at hand.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenrun.testing.proc import child_env, error_line, run_qwenrun

pytestmark = pytest.mark.slow

TIMEOUT = 120
SMALL = ("--max-tokens", "4", "--seed", "1", "--ctx", "512")
REASON = "calibrated on H200 measurements"  # a phrase of the plan's speed reason


@pytest.fixture
def model(tiny_models) -> str:
    return str(tiny_models("qwen3moe", steer=2))


def chat(model: str, lines: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", model, *SMALL, *args],
        input=lines,
        capture_output=True,
        text=True,
        errors="replace",
        env=child_env(),
        cwd=cwd,
        timeout=TIMEOUT,
    )


# ---- the start


def test_chat_starts_with_one_line_of_facts_and_the_reasons_only_with_verbose(model, tmp_path):
    quiet = chat(model, "/exit\n", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("qwenrun · "))
    # The facts line, then at once the REPL's own line: no reasons in between.
    assert "/help for commands" in lines[head + 1]
    facts = lines[head]
    for fact in ("F32", "all on the CPU", "tok/s expected", "context 512 tokens"):
        assert fact in facts
    assert REASON not in quiet.stderr
    assert quiet.stderr.count("context 512 tokens") == 1

    verbose = chat(model, "/exit\n", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert REASON in verbose.stderr
    assert "context 512 tokens: as asked" in verbose.stderr


def test_serve_starts_with_a_few_lines(model, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwenrun", "serve", model, "--port", "0", "--ctx", "512"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while "ready: " not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(TIMEOUT)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    ready = next(i for i, line in enumerate(lines) if "ready: " in line)
    # "listening on …", the facts, the ready line: the reasons only with --verbose.
    assert ready <= 3, text
    assert REASON not in text
    assert any("context 512 tokens" in ln and "tok/s expected" in ln for ln in lines[:ready])


# ---- --help


def test_help_uses_the_terminal_width_and_the_usual_metavars():
    narrow = run_qwenrun("run", "--help", env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    text = narrow.stdout
    assert "<bool>" not in text and "<int>" not in text and "<str>" not in text
    assert re.search(r"--ctx INTEGER\s+Context size in tokens \(default: planned\)\.", text)
    assert "Usage: qwenrun run [OPTIONS] MODEL [PROMPT]" in " ".join(text.split()).replace(
        "python -m qwenrun", "qwenrun"
    )
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = run_qwenrun("run", "--help", env={"COLUMNS": "200"})
    # The whole help of an option on one line when the terminal is wide enough.
    assert re.search(
        r"--cpu-moe-from TEXT\s+Which layers' experts go to the CPU: last \(default, as "
        r"llama\.cpp's --fit\) or first\.",
        wide.stdout,
    )
    commands = run_qwenrun("--help", env={"COLUMNS": "80"}).stdout
    # Each command's line whole, wrapped rather than cut ("thinking or direct...").
    assert "Chat in the terminal" in commands and not re.search(r"\w\.\.\.$", commands, re.M)


# ---- the disk cache, bench


def test_verbose_run_says_the_prompt_came_from_the_disk_cache(tiny_models, tmp_path):
    plain = str(tiny_models("qwen3moe"))
    document = " ".join(f"word{i}" for i in range(600)) + "\n"  # over the cache's minimum
    args = ("run", plain, "question", "--max-tokens", "2", "--ctx", "8192", "--verbose")
    first = run_qwenrun(*args, stdin=document)
    second = run_qwenrun(*args, stdin=document)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "from the disk cache" not in first.stderr
    stats = next(ln for ln in second.stderr.splitlines() if ln.startswith(("TTFT", "[")))
    assert re.search(r"prompt: [\d,]+ tokens from the disk cache in [\d.]+ s", stats), stats
    assert "prefill" not in stats  # a disk read is no prefill speed


def test_bench_shows_each_run_and_the_time_left(model):
    proc = run_qwenrun("bench", model, "--rounds", "2", "--prompt", "16", "--gen", "4")
    assert proc.returncode == 0, proc.stderr
    results = re.findall(r"^  decode [\d.]+ tok/s, prefill [\d,]+ tok/s", proc.stderr, re.M)
    runs = re.findall(r"^run \d+/(\d+): ", proc.stderr, re.M)
    assert runs and len(results) == int(runs[0])  # one figure per run
    assert re.search(r"about \d+ (s|min) left", proc.stderr)


# ---- limits said alike


def test_think_refuses_an_argument(model, tmp_path):
    proc = chat(model, "/think extra\n/nothink 3\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "/think takes nothing after it, not 'extra' (/budget N sets the thinking budget)" in (
        proc.stderr
    )
    assert "/nothink takes nothing after it" in proc.stderr
    assert "Thinking mode" not in proc.stderr and "Direct mode" not in proc.stderr


def test_a_budget_on_a_model_that_never_thinks_is_said_alike_everywhere(tiny_models, tmp_path):
    direct = str(tiny_models("qwen3moe", steer=2, chat_template="qwen3-coder"))
    note = "never thinks: a thinking budget has no effect on it"
    run = run_qwenrun("run", direct, "hi", *SMALL, "--budget", "3")
    assert run.returncode == 0, run.stderr
    assert note in run.stderr
    in_chat = chat(direct, "/budget 3\n", cwd=tmp_path)
    assert in_chat.returncode == 0, in_chat.stderr
    assert in_chat.stderr.count(note) == 1
    started = chat(direct, "/exit\n", "--budget", "3", cwd=tmp_path)
    assert note in started.stderr


# ---- true words


def test_saving_over_a_file_that_exists_but_cannot_be_replaced(model, tmp_path):
    proc = chat(model, "/save /proc/version\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cannot save to /proc/version: no new file can be made in /proc" in proc.stderr
    assert "/proc/version: no such file or directory" not in proc.stderr


def test_a_plan_for_another_machine_does_not_speak_of_this_one(model):
    proc = run_qwenrun("plan", model, "--ram", "1MiB")
    line = error_line(proc, 4)
    assert "the machine you describe (--ram) can give" in line
    assert "this machine" not in line


def test_an_hf_endpoint_that_is_not_a_url_says_so():
    proc = run_qwenrun("pull", "Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M", "-y", env={"HF_ENDPOINT": "nourl"})
    line = error_line(proc, 2)
    assert "HF_ENDPOINT='nourl' is not a URL" in line
    assert "resumes" not in line


def test_more_gpu_layers_than_the_model_has_reads_as_all_of_them(model):
    proc = run_qwenrun("plan", model, "--gpu-layers", "999", "--gpu-mem", "8GiB")
    assert proc.returncode == 0, proc.stderr
    assert "GPU: all 4 layers" in proc.stdout
    assert "999 layers" not in proc.stdout
