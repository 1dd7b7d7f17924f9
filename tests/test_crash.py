"""llama.cpp dying by a signal: the once-per-machine CPU kernel check, its fallback, and the
one line a user sees when qwenrun dies anyway (engine/crash.py).

The AMX crash itself needs an Intel CPU whose AMX kernels fault; these tests prove the
fallback path on any machine: the check's probe is made to die by a signal on purpose, and
a remembered "crashed" verdict for this very machine drives a real `qwenrun run`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qwenrun import hwprobe
from qwenrun.engine import crash
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.testing.proc import child_env, error_line, run_qwenrun
from qwenrun.synthetic.tiny_gguf import Dims, write_model

AMX_CPU = frozenset({"avx2", "avx512f", "amx_tile", "amx_int8"})
DIES_BY_SIGILL = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
KQUANT_DIMS = Dims(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(
        tmp_path_factory.mktemp("kq"), "qwen3", n_layer=2, dtype="q4_k", steer=0, dims=KQUANT_DIMS
    )


def never(*_a: object) -> crash.CpuCheck:
    raise AssertionError("the probe must not run")


# ---- the check


def test_a_probe_that_dies_by_a_signal_turns_the_extra_buffer_types_off():
    found = crash.cpu_check("Test Xeon", AMX_CPU, probe=lambda: crash.run_probe(DIES_BY_SIGILL))
    assert found.status == "crashed" and not found.extra_bufts
    assert "SIGILL" in found.detail
    assert "slower" in found.describe()  # the cost is stated
    # Remembered: the next start does not probe again, and keeps the verdict.
    again = crash.cpu_check("Test Xeon", AMX_CPU, probe=never)
    assert again == found
    assert (Path(os.environ["QWENRUN_HOME"]) / "cpu-check.json").is_file()


def test_a_cpu_without_amx_is_not_probed():
    found = crash.cpu_check("Test EPYC", frozenset({"avx2", "avx512f"}), probe=never)
    assert found.status == "unchecked" and found.extra_bufts


def test_a_probe_that_cannot_tell_is_not_remembered():
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    found = crash.cpu_check("Test Xeon", AMX_CPU, probe=lambda: crash.run_probe(failing))
    assert found.status == "unchecked" and found.extra_bufts
    assert crash.recalled(crash.check_key("Test Xeon", AMX_CPU)) is None


def test_a_rebuilt_llama_cpp_is_checked_again(monkeypatch):
    crash.remember(crash.check_key("Test Xeon", AMX_CPU), crash.CpuCheck("crashed", "x"))
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/nonexistent/another-build")
    assert crash.recalled(crash.check_key("Test Xeon", AMX_CPU)) is None


@pytest.mark.parametrize(("value", "status"), [("0", "forced-off"), ("1", "forced-on")])
def test_the_environment_overrides_the_check(monkeypatch, value, status):
    monkeypatch.setenv(crash.ENV_OVERRIDE, value)
    assert crash.cpu_check("Test Xeon", AMX_CPU, probe=never).status == status


def test_the_real_probe_decodes_a_kquant_model_on_this_machine():
    # The child writes a Q4_K model, loads it with the extra buffer types on and decodes.
    assert crash.run_probe() == crash.CpuCheck("ok", "a K-quant model decoded with them")
    home = Path(os.environ["QWENRUN_HOME"])
    assert not list(home.glob("cpu-check-*"))  # its model is gone again


# ---- the fallback


def test_the_engine_loads_without_the_extra_buffer_types(kquant_model):
    with Engine.load(kquant_model, LoadConfig(n_ctx=256, extra_bufts=False)) as plain:
        assert not [b for b in plain.placement.buffers if "REPACK" in b.buft]
    if "avx2" in hwprobe.probe().cpu_flags:  # where llama.cpp repacks Q4_K at all
        with Engine.load(kquant_model, LoadConfig(n_ctx=256)) as repacked:
            assert [b for b in repacked.placement.buffers if "REPACK" in b.buft]


def _remember_crash_for_this_machine() -> None:
    hw = hwprobe.probe()
    key = crash.check_key(hw.cpu_model, hw.cpu_flags)
    crash.remember(key, crash.CpuCheck("crashed", "the check died with SIGILL"))


def test_run_uses_the_plain_kernels_and_says_so_once(kquant_model):
    _remember_crash_for_this_machine()
    proc = run_qwenrun(
        "run", str(kquant_model), "hi", "--max-tokens", "3", "--ctx", "256", "--json", "--verbose"
    )
    assert proc.returncode == 0, proc.stderr
    buffers = json.loads(proc.stdout)["placement"]["buffers"]
    assert not [b for b in buffers if "REPACK" in b["buft"]]
    assert proc.stderr.count("extra CPU buffer types are off") == 1
    plan = run_qwenrun("plan", str(kquant_model), "--json")
    assert any("AMX kernels crash" in r for r in json.loads(plan.stdout)["reasons"])


def test_doctor_reports_the_finding_instead_of_ok():
    _remember_crash_for_this_machine()
    proc = run_qwenrun("doctor", "--json")
    found = [f for f in json.loads(proc.stdout)["findings"] if f["topic"] == "cpu-kernels"]
    assert found and found[0]["level"] == "warn"
    assert "crash" in found[0]["text"]


# ---- dying by a signal anyway


def test_a_death_by_signal_is_one_line_and_the_shell_exit_status():
    code = (
        "import os, signal\n"
        "from qwenrun.engine import crash\n"
        "crash.supervise(lambda: os.kill(os.getpid(), signal.SIGILL))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60
    )
    line = error_line(proc, 128 + signal.SIGILL)
    assert "illegal instruction" in line and "doctor" in line


def test_a_real_qwenrun_killed_by_the_oom_killer_says_so(kquant_model):
    # A chat waiting for input; its worker (the supervised child) is killed as the OOM
    # killer would, and the user still gets one line.
    proc = _waiting_chat(kquant_model)
    try:
        worker = _child_of(proc.pid)
        worker.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL
    assert err.strip().splitlines()[-1].startswith("error: qwenrun was killed (SIGKILL)")
    assert "Traceback" not in err


def test_a_signal_sent_to_qwenrun_reaches_its_worker(kquant_model):
    proc = _waiting_chat(kquant_model)
    try:
        worker = _child_of(proc.pid)
        proc.send_signal(signal.SIGTERM)  # as `kill PID` or a service manager would
        proc.communicate(timeout=60)
        worker.wait(timeout=30)  # gone too: never left running alone
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE


def _waiting_chat(model: Path) -> subprocess.Popen[str]:
    """A real `qwenrun chat`, waiting for input on a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "qwenrun", "chat", str(model), "--ctx", "256"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def _child_of(pid: int, timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("qwenrun started no worker process")
