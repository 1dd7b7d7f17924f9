"""llama.cpp dying by a signal: the once-per-machine CPU kernel check, its fallback, and the
one line a user sees when qwenrun dies anyway (engine/crash.py).

The AMX crash itself needs an Intel CPU whose AMX kernels fault; these tests prove the
fallback path on any machine: the check's probe is made to die by a signal on purpose, and
a remembered "crashed" verdict for this very machine drives a real `qwenrun run`. What the
real check says on this machine is held against what really happens here: the same kind of
K-quant model decoded in a child process with the extra buffer types on (`decode_here`).
On a CPU without AMX that decode works and nothing is probed; on an Intel CPU with working
AMX kernels it works and the check says "ok"; where they die by SIGILL the decode dies too,
the check says "crashed", and qwenrun loads without them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import psutil
import pytest

from qwenrun import hwprobe
from qwenrun.engine import crash
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.synthetic.tiny_gguf import Dims, write_model
from qwenrun.testing.proc import child_env, error_line, run_qwenrun

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


def _extra(buffers: list[str]) -> list[str]:
    """The buffers of llama.cpp's extra CPU buffer types: repacked weights, AMX tiles."""
    return [b for b in buffers if "REPACK" in b or b == "AMX"]


@pytest.fixture(scope="module")
def decode_here(kquant_model: Path) -> subprocess.CompletedProcess[str]:
    """What really happens on this machine: the K-quant model decoded in a child process with
    llama.cpp's extra buffer types on, through qwenrun's engine (not the check's own code)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from qwenrun.engine.llama import Engine\n"
        "from qwenrun.engine.values import SamplingParams\n"
        "from qwenrun.engine.loadconfig import LoadConfig\n"
        "config = LoadConfig(n_ctx=256, extra_bufts=True, prompt_cache=0)\n"
        "with Engine.load(Path(sys.argv[1]), config) as e:\n"
        "    e.generate(e.tokenize('hello'), SamplingParams(temperature=0.0), 4).text()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(kquant_model)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    # It decodes, or llama.cpp dies by a signal: anything else is a broken test machine.
    assert done.returncode <= 0, done.stderr
    return done


def _has_amx() -> bool:
    return bool(hwprobe.probe().cpu_flags & crash.AMX_FLAGS)


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
    assert found.status == "no-amx" and found.extra_bufts
    assert "no AMX on this CPU" in found.describe()


@pytest.mark.slow
def test_a_probe_that_cannot_tell_is_not_remembered():
    failing = [sys.executable, "-c", "import sys; sys.exit('no llama here')"]
    found = crash.cpu_check("Test Xeon", AMX_CPU, probe=lambda: crash.run_probe(failing))
    assert found.status == "unchecked" and found.extra_bufts
    assert "status 1: no llama here" in found.detail  # why, in the child's own last words
    # An AMX CPU is never said to have none; what was not checked is said so.
    assert "no AMX" not in found.describe() and "could not be checked" in found.describe()
    assert crash.recalled(crash.check_key("Test Xeon", AMX_CPU)) is None


@pytest.mark.slow
def test_a_probe_child_killed_by_a_signal_leaves_no_folder(tmp_path):
    # The child writes into the folder it is given, as the probe writes its 756 KB model,
    # then dies by SIGSEGV before it can clean up anything: the parent removes the folder.
    record = tmp_path / "folder-it-was-given"
    code = (
        "import os, signal, sys\n"
        "open(os.path.join(sys.argv[1], 'model.gguf'), 'wb').write(bytes(4096))\n"
        f"open({str(record)!r}, 'w').write(sys.argv[1])\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    found = crash.run_probe([sys.executable, "-c", code])
    assert found == crash.CpuCheck("crashed", "the check died with SIGSEGV")
    folder = Path(record.read_text())
    assert folder.name.startswith(crash.PROBE_PREFIX)
    assert not folder.exists()
    # Nothing in the home either (where the folder used to be made).
    assert not Path(os.environ["QWENRUN_HOME"]).exists()


def test_a_rebuilt_llama_cpp_is_checked_again(monkeypatch):
    crash.remember(crash.check_key("Test Xeon", AMX_CPU), crash.CpuCheck("crashed", "x"))
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/nonexistent/another-build")
    assert crash.recalled(crash.check_key("Test Xeon", AMX_CPU)) is None


@pytest.mark.parametrize(("value", "status"), [("0", "forced-off"), ("1", "forced-on")])
def test_the_environment_overrides_the_check(monkeypatch, value, status):
    monkeypatch.setenv(crash.ENV_OVERRIDE, value)
    assert crash.cpu_check("Test Xeon", AMX_CPU, probe=never).status == status


@pytest.mark.slow
def test_the_real_check_agrees_with_a_real_decode_on_this_machine(decode_here):
    # The probe child writes a Q4_K model, loads it with the extra buffer types on, decodes.
    verdict = crash.run_probe()
    if decode_here.returncode == 0:
        assert verdict == crash.CpuCheck("ok", "a K-quant model decoded with them")
    else:
        died = signal.Signals(-decode_here.returncode).name
        assert verdict == crash.CpuCheck("crashed", f"the check died with {died}")
    # What qwenrun goes by here: the extra buffer types exactly where a decode survives them.
    hw = hwprobe.probe()
    check = crash.cpu_check(hw.cpu_model, hw.cpu_flags)
    assert check.extra_bufts == (decode_here.returncode == 0)
    assert check.status == ("no-amx" if not _has_amx() else verdict.status)
    # Its model is gone again, even where the probe child died by a signal.
    assert not list(Path(os.environ["QWENRUN_HOME"]).glob("cpu-check-*"))


# ---- the fallback


@pytest.mark.slow
def test_the_engine_loads_without_the_extra_buffer_types(kquant_model):
    with Engine.load(kquant_model, LoadConfig(n_ctx=256, extra_bufts=False)) as plain:
        assert not _extra([b.buft for b in plain.placement.buffers])
    if "avx2" in hwprobe.probe().cpu_flags:  # where llama.cpp repacks Q4_K at all
        # Loaded, never decoded: safe in this process even where the AMX kernels die. The
        # load only converts the weights (AVX-512 code); the tile instructions that fault
        # run in the matrix multiplications of a decode.
        with Engine.load(kquant_model, LoadConfig(n_ctx=256)) as repacked:
            # AMX tiles where llama.cpp was built with them (an Intel CPU with AMX), else
            # repacked copies for the AVX2/AVX-512 kernels.
            assert _extra([b.buft for b in repacked.placement.buffers])


def _remember_crash_for_this_machine() -> None:
    hw = hwprobe.probe()
    key = crash.check_key(hw.cpu_model, hw.cpu_flags)
    crash.remember(key, crash.CpuCheck("crashed", "the check died with SIGILL"))


@pytest.mark.slow
def test_run_uses_the_plain_kernels_and_says_so_once(kquant_model):
    _remember_crash_for_this_machine()
    proc = run_qwenrun(
        "run", str(kquant_model), "hi", "--max-tokens", "3", "--ctx", "256", "--json", "--verbose"
    )
    assert proc.returncode == 0, proc.stderr
    buffers = json.loads(proc.stdout)["placement"]["buffers"]
    assert not _extra([b["buft"] for b in buffers])
    assert proc.stderr.count("extra CPU buffer types are off") == 1
    plan = run_qwenrun("plan", str(kquant_model), "--json")
    assert any("AMX kernels crash" in r for r in json.loads(plan.stdout)["reasons"])


@pytest.mark.slow
def test_doctor_reports_the_finding_instead_of_ok():
    _remember_crash_for_this_machine()
    proc = run_qwenrun("doctor", "--json")
    found = [f for f in json.loads(proc.stdout)["findings"] if f["topic"] == "cpu-kernels"]
    assert found and found[0]["level"] == "warn"
    assert "crash" in found[0]["text"]


# ---- a home that cannot be written


def _unwritable_home(tmp_path: Path, where: str) -> tuple[Path, bool]:
    """A QWENRUN_HOME that cannot keep a file, and whether it can after all (a read-only
    folder is writable for root: asked by writing, the only answer that holds for both)."""
    a_file = tmp_path / "home-is-a-file"
    a_file.write_text("not a folder")
    if where == "a file":
        return a_file, False
    if where == "below a file":
        return a_file / "qwenrun", False
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
    except OSError:
        return folder, False
    (folder / "probe").unlink()
    return folder, True


def _kernel_finding(proc: subprocess.CompletedProcess[str], code: int = 0) -> tuple[dict, str]:
    assert proc.returncode == code, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    (host,) = [f["text"] for f in findings if f["topic"] == "host"]
    (kernels,) = [f for f in findings if f["topic"] == "cpu-kernels"]
    return kernels, host


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a file", "below a file", "read-only"])
def test_doctor_with_an_unwritable_home_says_what_is_true(tmp_path, decode_here, where):
    home, writable = _unwritable_home(tmp_path, where)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_qwenrun("doctor", "--json", env={"QWENRUN_HOME": str(home), "TMPDIR": str(tmp)})
    kernels, host = _kernel_finding(proc)
    if not _has_amx():
        assert "amx_tile" not in host
        assert kernels["text"] == "llama.cpp's CPU kernels: no AMX on this CPU, nothing to check"
    else:
        # The check ran without a home, and says what really happens here.
        assert "amx_tile" in host and "no AMX" not in kernels["text"]
        if decode_here.returncode == 0:
            assert kernels["level"] == "ok" and "they work" in kernels["text"]
        else:
            assert kernels["level"] == "warn" and "crash on this CPU" in kernels["text"]
        assert ("checked again next time" in kernels["text"]) == (not writable)
    # The probe's model went into TMPDIR and is gone, even where its child died by a signal.
    assert list(tmp.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "status_words"),
    [
        ({crash.ENV_OVERRIDE: "0"}, "are off (QWENRUN_EXTRA_BUFFERS=0)"),
        ({crash.ENV_OVERRIDE: "1"}, "are on (QWENRUN_EXTRA_BUFFERS=1), unchecked"),
        # A llama.cpp that does not load: the probe cannot tell, and doctor says why.
        ({"LLAMA_CPP_LIB_PATH": "/nonexistent/build"}, "could not be checked (the check exited"),
    ],
)
def test_doctor_says_what_is_true_when_forced_or_unchecked(tmp_path, env, status_words):
    home, _ = _unwritable_home(tmp_path, "a file")
    proc = run_qwenrun("doctor", "--json", env={"QWENRUN_HOME": str(home), **env})
    # A llama.cpp that does not load is an error finding of its own: doctor exits 1.
    kernels, _host = _kernel_finding(proc, 1 if "LLAMA_CPP_LIB_PATH" in env else 0)
    if crash.ENV_OVERRIDE in env or _has_amx():
        assert status_words in kernels["text"]
    else:  # nothing is probed on a CPU without AMX
        assert kernels["text"] == "llama.cpp's CPU kernels: no AMX on this CPU, nothing to check"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_run_with_an_unwritable_home_keeps_the_guard(kquant_model, decode_here, tmp_path, where):
    home, _ = _unwritable_home(tmp_path, where)
    args = ("run", str(kquant_model), "hello", "--max-tokens", "5", "--ctx", "256")
    proc = run_qwenrun(*args, "--json", "--verbose", env={"QWENRUN_HOME": str(home)})
    # Where the AMX kernels die, a guard switched off by the home ended here with SIGILL.
    assert proc.returncode == 0, proc.stderr
    extra = _extra([b["buft"] for b in json.loads(proc.stdout)["placement"]["buffers"]])
    if decode_here.returncode != 0:
        assert not extra
        # Said once: the verdict holds for this run only.
        assert proc.stderr.count("checked again next time") == 1
    elif "avx2" in hwprobe.probe().cpu_flags:
        assert extra
    # No progress chatter on a stderr that is not a terminal.
    assert crash.CHECKING not in proc.stderr


def _start_on_a_terminal(model: Path, **env: str) -> str:
    """`qwenrun run` on a pseudo-terminal; what it showed."""
    return _on_a_terminal(["run", str(model), "hi", "--max-tokens", "2"], **env)


def _on_a_terminal(args: list[str], **env: str) -> str:
    """A qwenrun command on a pseudo-terminal; what it showed."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenrun", *args],
        env=child_env({"TERM": "xterm-256color", **env}),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 400),  # wide: the line names a path, and must not wrap
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


@pytest.mark.slow
def test_the_first_start_on_a_terminal_says_it_checks_the_cpu_kernels_once(tiny_models):
    model = tiny_models("qwen3moe", steer=2)
    first, second = _start_on_a_terminal(model), _start_on_a_terminal(model)
    # Said while the check runs, which only a CPU with AMX needs; the verdict is then kept.
    assert (crash.CHECKING in first) == _has_amx()
    assert crash.CHECKING not in second


@pytest.mark.slow
@pytest.mark.parametrize("command", [["probe"], ["plan", "qwen3-30b-a3b"], ["doctor"]])
def test_every_command_that_checks_the_cpu_kernels_says_so_on_a_terminal(command, tmp_path):
    shown = _on_a_terminal(command, QWENRUN_HOME=str(tmp_path / "home"))
    assert (crash.CHECKING in shown) == _has_amx()


@pytest.mark.slow
def test_a_terminal_start_says_why_the_check_runs_again_with_an_unwritable_home(
    tiny_models, tmp_path
):
    model = tiny_models("qwen3moe", steer=2)
    home, _ = _unwritable_home(tmp_path, "a file")
    said = crash.CHECKING_AGAIN.format(why=f"{home} is a file, not a folder")
    for _ in range(2):
        shown = _start_on_a_terminal(model, QWENRUN_HOME=str(home))
        assert (said in shown) == _has_amx()


# ---- dying by a signal anyway


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
