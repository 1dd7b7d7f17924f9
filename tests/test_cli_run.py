"""`qwenrun run` end to end: a real process, real llama.cpp, generated models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from qwenrun.testing.proc import child_env, error_line, run_qwenrun


def qwenrun(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_qwenrun(*args, stdin=stdin, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert text in error_line(proc, code)
    assert proc.stdout == ""


SMALL = ("--max-tokens", "12", "--seed", "1", "--ctx", "512")


@pytest.mark.slow
def test_plain_answer_on_stdout(tiny_models):
    model = tiny_models("qwen3moe", steer=2)
    proc = qwenrun("run", str(model), "hello", *SMALL, "--no-think")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != ""
    assert "\x1b[" not in proc.stdout
    assert "<think>" not in proc.stdout


@pytest.mark.slow
def test_json_output_schema(tiny_models):
    model = tiny_models("qwen3moe", steer=2)
    proc = qwenrun("run", str(model), "hello", *SMALL, "--json", "--n-cpu-moe", "2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"answer", "thinking", "stats", "placement"}
    assert set(doc["stats"]) >= {
        "prompt_tokens",
        "eval_prompt_tokens",
        "generated_tokens",
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
        "decode_wall_ms",
        "llama_eval_ms",
        "llama_sample_ms",
    }
    assert doc["stats"]["generated_tokens"] == 12
    placement = doc["placement"]
    assert set(placement) >= {"n_gpu_layers", "cpu_moe_layers", "overridden_tensors", "buffers"}
    assert placement["cpu_moe_layers"] == [0, 1]
    assert len(placement["overridden_tensors"]) == 6


@pytest.mark.slow
def test_same_seed_same_answer_and_stdin_changes_the_prompt(tiny_models):
    model = str(tiny_models("qwen3moe", steer=2))
    a = qwenrun("run", model, "hello", *SMALL, "--json")
    b = qwenrun("run", model, "hello", *SMALL, "--json")
    c = qwenrun("run", model, "hello", *SMALL, "--json", stdin="some piped context\n")
    for p in (a, b, c):
        assert p.returncode == 0, p.stderr
    ja, jb, jc = (json.loads(p.stdout) for p in (a, b, c))
    assert ja["answer"] == jb["answer"]
    # Piped text joins the prompt (before the argument): more prompt tokens.
    assert jc["stats"]["prompt_tokens"] > ja["stats"]["prompt_tokens"]


@pytest.mark.slow
def test_prompt_from_stdin_alone(tiny_models):
    model = str(tiny_models("qwen3moe", steer=2))
    proc = qwenrun("run", model, *SMALL, stdin="what is this?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_no_prompt_at_all_is_a_usage_error(tiny_models):
    proc = qwenrun("run", str(tiny_models("qwen3moe")))
    assert_one_line_error(proc, 2, "no prompt")


@pytest.mark.slow
def test_missing_path(tmp_path):
    proc = qwenrun("run", str(tmp_path / "missing.gguf"), "hi")
    assert_one_line_error(proc, 3, "no such file")


@pytest.mark.slow
def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    proc = qwenrun("run", str(bad), "hi")
    assert_one_line_error(proc, 3, "not a GGUF")


@pytest.mark.slow
def test_truncated_gguf(tiny_models, tmp_path):
    data = tiny_models("qwen3moe").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    proc = qwenrun("run", str(cut), "hi")
    assert_one_line_error(proc, 3, "truncated")


@pytest.mark.slow
def test_unsupported_architecture(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(path, "qwen9moe")
    w.add_uint32("qwen9moe.block_count", 1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = qwenrun("run", str(path), "hi")
    assert_one_line_error(proc, 3, "qwen9moe")


@pytest.mark.slow
def test_prompt_longer_than_context(tiny_models):
    model = str(tiny_models("qwen3moe"))
    proc = qwenrun("run", model, "word " * 600, "--ctx", "256")
    assert_one_line_error(proc, 4, "context")


@pytest.mark.slow
def test_bad_option_values_are_one_line(tiny_models):
    model = str(tiny_models("qwen3moe"))
    proc = qwenrun("run", model, "hi", "--cpu-moe", "--n-cpu-moe", "2")
    assert_one_line_error(proc, 2, "--cpu-moe")


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    proc = qwenrun("run", str(tmp_path / "missing.gguf"), "hi", env={"QWENRUN_DEBUG": "1"})
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_closed_stdout_ends_quietly(tiny_models):
    model = str(tiny_models("qwen3moe", steer=2))
    cmd = (
        f"{sys.executable} -m qwenrun run {model} hello --max-tokens 400 --ctx 1024 "
        "| head -c 1 >/dev/null"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert "Traceback" not in proc.stderr
    assert "BrokenPipe" not in proc.stderr
    assert proc.stderr.strip() == ""


@pytest.mark.slow
def test_help_does_not_import_llama_cpp():
    code = (
        "import sys\n"
        "from qwenrun.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'run' in r.output\n"
        "print('llama_cpp' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.slow
def test_python_dash_m_and_version():
    proc = qwenrun("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("qwenrun ")


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing a command does may land in the working directory.
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_thinking_goes_to_stderr_only_with_show_thinking(tiny_models):
    # Qwen3.5's template opens <think> itself; steer=2 never closes it, so the budget does:
    # 6 thinking tokens, then the forced wrap-up (a token per byte in this tiny vocabulary)
    # and `</think>`, then the answer.
    model = str(tiny_models("qwen35moe", steer=2))
    args = ("run", model, "hello", "--think", "--budget", "6", "--max-tokens", "400", "--seed", "3")
    as_json = qwenrun(*args, "--json", "--ctx", "512")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["thinking"] and doc["answer"]

    shown = qwenrun(*args, "--show-thinking", "--ctx", "512")
    assert shown.returncode == 0, shown.stderr
    # Text-mode pipes read "\r" as "\n"; the JSON string kept it as written.
    answer = doc["answer"].replace("\r\n", "\n").replace("\r", "\n")
    assert shown.stdout.strip() == answer.strip()
    assert doc["thinking"].strip()[:20] in shown.stderr
    assert "\x1b[" not in shown.stdout + shown.stderr

    hidden = qwenrun(*args, "--ctx", "512")
    assert hidden.stdout == shown.stdout
    assert doc["thinking"].strip()[:20] not in hidden.stderr
