"""Qwen3.8 as a user runs it (issue 17): a generated Qwen3.8-Flash-Next (`qwen4exp`) GGUF
through real `qwenrun run`, `chat` and `serve` processes; its reasoning effort (`--effort`,
`/effort`, the server's `reasoning_effort`); a thinking-only template like Qwen3.8-2.4T's,
which raises on `enable_thinking=false`; and the engine's one-token logits reserve."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenrun.synthetic.tiny_gguf import template_text
from qwenrun.testing.proc import child_env, error_line, run_qwenrun

pytestmark = pytest.mark.slow
TIMEOUT = 120.0
ARCH = "qwen4exp"
CHOICES = "choose xhigh, medium, low"


def thinking_only_template() -> str:
    """The reconstructed Qwen3.8 template, refusing direct mode as Qwen3.8-2.4T-A95B's does."""
    refusal = (
        "{%- if enable_thinking is defined and enable_thinking is false %}\n"
        "    {{- raise_exception('This model only supports thinking mode.') }}\n"
        "{%- endif %}\n"
    )
    return refusal + template_text("qwen3.8")


@pytest.fixture(scope="module")
def flash(tiny_models) -> Path:
    return tiny_models(ARCH, steer=2)  # never stops by itself: answers last --max-tokens


def run_json(model: Path, *args: str) -> dict[str, Any]:
    proc = run_qwenrun("run", str(model), "hello there", "--json", "--ctx", "2048", *args)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


# ------------------------------------------------------------------------------ run and chat


def test_run_answers_with_a_qwen4exp_model(flash):
    doc = run_json(flash, "--max-tokens", "6", "--seed", "1")
    assert doc["stats"]["generated_tokens"] == 6 and doc["finish_reason"] == "length"
    assert doc["mode"] == "think"  # Qwen3.8 thinks by default
    assert doc["placement"]["buffers"] and "Traceback" not in json.dumps(doc)
    direct = run_json(flash, "--max-tokens", "6", "--no-think")
    assert direct["mode"] == "direct" and direct["stats"]["generated_tokens"] == 6


def _stats(out: str, label: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(label)]


def test_chat_turn_two_evaluates_only_what_turn_one_did_not(flash, tmp_path):
    script = "first question here\n/stats\nthe second question\n/stats\n"
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", str(flash), "--max-tokens", "8", "--ctx", "2048"],
        input=script,
        capture_output=True,
        text=True,
        env=child_env({"QWENRUN_HOME": str(tmp_path / "home")}),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    lasts = _stats(proc.stderr, "last ")
    assert len(lasts) == 2, proc.stderr
    (p1, e1), (p2, e2) = (
        tuple(int(x) for x in re.search(r"(\d+) prompt tokens \((\d+) evaluated", line).groups())  # type: ignore[union-attr]
        for line in lasts
    )
    assert e1 == p1  # the first prompt, whole
    reused = re.search(r"(\d+) of (\d+) prompt tokens from a checkpoint", proc.stderr)
    assert reused is not None, proc.stderr
    assert int(reused.group(2)) == p2 and int(reused.group(1)) + e2 == p2
    # Turn 2 evaluates what came after turn 1's prompt (its answer, as the template writes
    # it back, and the new message) and the few tokens of the template's frame before it.
    assert e2 <= (p2 - p1) + 8 and int(reused.group(1)) >= p1 - 8


def test_effort_reaches_the_template(flash):
    tokens = {
        effort: run_json(flash, "--max-tokens", "1", "--effort", effort)["stats"]["prompt_tokens"]
        for effort in ("xhigh", "medium", "low")
    }
    # xhigh and low put their own paragraph in a system turn; medium none.
    assert tokens["medium"] < tokens["low"] < tokens["xhigh"]
    assert run_json(flash, "--max-tokens", "1")["stats"]["prompt_tokens"] == tokens["xhigh"]


def test_an_effort_the_template_refuses_is_a_one_line_error(flash, tiny_models):
    line = error_line(run_qwenrun("run", str(flash), "hi", "--effort", "high"), 2)
    assert "reasoning effort 'high'" in line and CHOICES in line
    qwen35 = tiny_models("qwen35moe", steer=2)
    line = error_line(run_qwenrun("run", str(qwen35), "hi", "--effort", "low"), 2)
    assert "has no reasoning effort setting" in line


def test_effort_in_the_repl(flash, tiny_models, tmp_path):
    def chat(model: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qwenrun", "chat", str(model), "--max-tokens", "2", *args],
            input=script,
            capture_output=True,
            text=True,
            env=child_env({"QWENRUN_HOME": str(tmp_path / "home")}),
            timeout=TIMEOUT,
        )

    proc = chat(flash, "/effort\n/effort low\nhi\n/stats\n/effort high\n/effort default\n")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "Reasoning effort: the template's default (choices: xhigh, medium, low)." in err
    assert "Reasoning effort: low (choices" in err
    assert re.search(r"mode\s+thinking · effort low", err)
    assert "reasoning effort 'high' is not one" in err and CHOICES in err
    assert "Traceback" not in err
    proc = chat(tiny_models("qwen35moe", steer=2), "/effort low\n/effort\nhi\n", "--no-think")
    assert proc.returncode == 0 and proc.stderr.count("has no reasoning effort setting") == 2
    assert proc.stdout.strip()  # the chat went on


@pytest.mark.slow
def test_a_saved_chat_keeps_its_effort(flash, tmp_path):
    saved = tmp_path / "chat.json"
    script = f"/effort low\nhi\n/save {saved}\n/effort default\n/load {saved}\n/effort\n"
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", str(flash), "--max-tokens", "2"],
        input=script,
        capture_output=True,
        text=True,
        env=child_env({"QWENRUN_HOME": str(tmp_path / "home")}),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(saved.read_text())["effort"] == "low"
    # After /effort default and /load, the transcript's effort is back.
    assert proc.stderr.rstrip().splitlines()[-1].startswith("Reasoning effort: low")


# ------------------------------------------------------------------------------ thinking only


@pytest.fixture(scope="module")
def thinking_only(tiny_models) -> Path:
    return tiny_models(ARCH, steer=2, chat_template=thinking_only_template())


def test_a_thinking_only_model_thinks_and_says_it_has_no_direct_mode(thinking_only, tmp_path):
    doc = run_json(thinking_only, "--max-tokens", "4")
    assert doc["mode"] == "think"
    line = error_line(run_qwenrun("run", str(thinking_only), "hi", "--no-think"), 2)
    assert "always thinks: it has no direct mode" in line
    proc = subprocess.run(
        [sys.executable, "-m", "qwenrun", "chat", str(thinking_only), "--max-tokens", "2"],
        input="/nothink\nhi\n/stats\n",
        capture_output=True,
        text=True,
        env=child_env({"QWENRUN_HOME": str(tmp_path / "home")}),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "always thinks" in proc.stderr and "Traceback" not in proc.stderr
    assert "always thinks (/budget N caps it)" in proc.stderr  # the start-up line
    assert re.search(r"mode\s+thinking\n", proc.stderr)  # and the turn ran, thinking
    assert re.search(r"session\s+1 answer ", proc.stderr)


# ------------------------------------------------------------------------------ serve


class Served:
    """`qwenrun serve MODEL` on a free port; stderr read on a thread."""

    def __init__(self, model: Path, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenrun", "serve", str(model), "--port", "0", "--ctx", "2048"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env({"QWENRUN_HOME": str(home / "home"), "HF_HOME": str(home / "hf")}),
        )
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(TIMEOUT), "\n".join(self.lines)
        assert self.url, "\n".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
            if line.startswith("ready: ") or "ready:" in line:
                self._ready.set()
        self._ready.set()

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **body}
        req = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                return resp.status, dict(json.load(resp))
        except urllib.error.HTTPError as err:
            return err.code, dict(json.load(err))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(flash, tmp_path_factory) -> Iterator[Served]:
    server = Served(flash, tmp_path_factory.mktemp("serve-qwen4exp"))
    yield server
    server.stop()


def test_serve_answers_and_takes_reasoning_effort(served, flash):
    status, doc = served.chat({})
    assert status == 200 and doc["usage"]["completion_tokens"] == 2
    prompts = {}
    for effort in ("xhigh", "medium", "low"):
        status, doc = served.chat({"reasoning_effort": effort})
        assert status == 200, doc
        prompts[effort] = doc["usage"]["prompt_tokens"]
    assert prompts["medium"] < prompts["low"] < prompts["xhigh"]
    # chat_template_kwargs carries it too (as llama-server's clients send it).
    status, doc = served.chat({"chat_template_kwargs": {"reasoning_effort": "low"}})
    assert status == 200 and doc["usage"]["prompt_tokens"] == prompts["low"]
    for bad in ({"reasoning_effort": "high"}, {"chat_template_kwargs": {"reasoning_effort": "x"}}):
        status, doc = served.chat(bad)
        assert status == 400, doc
        assert doc["error"]["param"] == "reasoning_effort" and CHOICES in doc["error"]["message"]
    status, doc = served.chat({"reasoning_effort": 3})
    assert status == 400 and doc["error"]["param"] == "reasoning_effort"
    # `run --server --effort`: the client sends it.
    proc = run_qwenrun(
        "run", flash.stem, "hello", "--server", served.url, "--effort", "medium", "--json",
        "--max-tokens", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["prompt_tokens"] == prompts["medium"]  # same text


def test_serve_reuses_the_conversation_so_far(served):
    messages = [{"role": "user", "content": "tell me something"}]
    status, first = served.chat({"messages": messages, "max_tokens": 6})
    assert status == 200
    answer = first["choices"][0]["message"]
    messages += [
        {"role": "assistant", "content": answer.get("content") or ""},
        {"role": "user", "content": "and then?"},
    ]
    status, second = served.chat({"messages": messages, "max_tokens": 6})
    assert status == 200
    usage = second["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 8
    assert usage["prompt_tokens"] - cached < usage["prompt_tokens"] // 2


def test_a_thinking_only_model_served_answers_a_request_not_to_think(thinking_only, tmp_path):
    server = Served(thinking_only, tmp_path)
    try:
        status, doc = server.chat({"chat_template_kwargs": {"enable_thinking": False}})
        assert status == 200, doc  # it thinks with a zero budget: never a template error
        status, doc = server.chat({"reasoning_effort": "high"})
        assert status == 400 and CHOICES in doc["error"]["message"]
    finally:
        server.stop()
    assert not any("Traceback" in line for line in server.lines)


# ------------------------------------------------------------------------------ the engine


def test_the_logits_of_one_token_are_reserved_and_long_prompts_still_answer(tiny_models):
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig
    from qwenrun.engine.values import SamplingParams

    # Qwen3.5's vocabulary: llama.cpp's default reserve would hold 512 × 248,320 f32 logits
    # (485 MiB) in the compute buffer; the engine asks for one token's.
    path = tiny_models("qwen35moe", vocab_size=248_320, steer=2)
    config = LoadConfig(n_ctx=4096, n_batch=512, n_ubatch=512, prompt_cache=0)
    with Engine.load(path, config) as engine:
        assert any("n_outputs_max         = 1" in ln for ln in engine.log_lines)
        assert engine.placement.total("compute") < 64 << 20
        prompt = engine.tokenize("<|im_start|>user\n" + "many words here. " * 100)
        assert len(prompt) > 2 * config.n_ubatch  # several batches, each with one output
        gen = engine.generate(prompt, SamplingParams(temperature=0), 4)
        gen.text()
        assert gen.n_generated == 4 and gen.stats is not None
        assert gen.stats.eval_prompt_tokens == len(prompt)


# ------------------------------------------------------------------------------ pull


def test_pull_and_run_flash_next_by_its_catalog_name(flash, tmp_path):
    from qwenrun.testing.hub_server import HubServer

    repo = "unsloth/Qwen3.8-Flash-Next-GGUF"  # the catalog's first repo for it
    server = HubServer().start()
    try:
        server.add_repo(repo, {"Qwen3.8-Flash-Next-UD-Q4_K_XL.gguf": flash})
        env = {"HF_ENDPOINT": server.url}
        pulled = run_qwenrun("pull", "qwen3.8-flash-next:ud-q4_k_xl", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "qwen3.8-flash-next:UD-Q4_K_XL" in pulled.stderr
        (path,) = pulled.stdout.split()
        assert Path(path).read_bytes() == flash.read_bytes()
        ran = run_qwenrun(
            "run", "qwen3.8-flash-next:UD-Q4_K_XL", "hi", "--json", "--max-tokens", "3",
            "--ctx", "1024", env={**env, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["stats"]["generated_tokens"] == 3
        planned = run_qwenrun("plan", path, "--json", env=env)
        assert json.loads(planned.stdout)["ngram_table"]["place"] == "ram"
    finally:
        server.stop()
