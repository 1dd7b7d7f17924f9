"""llama.cpp dying by a signal: checked for once per machine, and never silent when it happens.

Contract, two parts:

- `cpu_check(cpu_model, cpu_flags)`: llama.cpp's native build gives the CPU "extra buffer
  types" (weights repacked for its AVX2/AVX-512 kernels, and on Intel CPUs with AMX, AMX tile
  kernels). On some machines (seen: an Intel Xeon VM whose /proc/cpuinfo lists amx_tile) the
  AMX kernels die with SIGILL on the first prompt of any K-quant model, in a worker thread,
  without a word. So when the CPU reports AMX, the first load runs a probe in a child process
  (`python -m qwenrun.engine.crash probe FOLDER`): a tiny generated Q4_K model, written into a
  folder the parent makes in the system's temporary folder and removes afterwards whatever
  became of the child, is loaded with the extra buffer types on and decodes a few tokens. A
  clean exit means they work; death by a signal means they do not, and qwenrun then loads with
  `use_extra_bufts = false` (plain kernels: slower CPU matmuls, no repacked copies). The
  verdict is remembered in `QWENRUN_HOME/cpu-check.json`, keyed by CPU model, its SIMD flags
  and the llama.cpp library (path, size, mtime), so a rebuilt llama.cpp is checked again. The
  check needs no writable home: where the verdict cannot be kept, it still decides for this
  process, says so (`CpuCheck.not_kept`), and runs again at the next start.
  `QWENRUN_EXTRA_BUFFERS=0` (or `1`) overrides the check. A CPU without AMX is not probed
  (verdict "no-amx"); a probe that cannot tell (a timeout, a broken install) gives
  "unchecked", with the reason, and is not remembered.
- `supervise(main)`: on Linux, the command runs in a forked child while the parent waits. When
  the child dies by a signal (SIGILL, SIGSEGV, SIGBUS, SIGABRT, a SIGKILL from the OOM killer),
  the parent prints one line saying what happened and what to try, and exits 128 + the signal's
  number as a shell would (a signal a user sends on purpose, such as SIGINT, SIGTERM or SIGPIPE,
  exits so without a line). Signals sent to the parent by another process are forwarded to the
  child; those the terminal sends (Ctrl-C) reach the child directly, so the parent ignores them
  (it tells the two apart by `si_code`); the child gets SIGTERM if the parent dies. An abort
  while the child used RPC workers is said as a lost worker (`engine/rpcrecord.py`:
  `death_line`). Elsewhere than Linux, or with `QWENRUN_NO_SUPERVISOR` set, the command simply
  runs in this process.

Nothing here plans or prints besides that one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NoReturn

from qwenrun import config
from qwenrun.atomic import write_atomic

AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16", "amx_fp16"})
# The flags that decide which kernels llama.cpp's native build compiles for this CPU.
KERNEL_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"})
PROBE_TIMEOUT_S = 180.0
ENV_OVERRIDE = "QWENRUN_EXTRA_BUFFERS"
# What the probe's temporary folder is called (in the system's temporary folder).
PROBE_PREFIX = "qwenrun-cpu-check-"

Status = Literal["ok", "crashed", "unchecked", "no-amx", "forced-on", "forced-off"]

# What `checking` is told while the probe runs (the start-up shows it on a terminal); the
# second where the home cannot keep the verdict, so that every start checks again.
CHECKING = "Checking llama.cpp's CPU kernels on this machine (once, a few seconds)…"
CHECKING_AGAIN = (
    "Checking llama.cpp's CPU kernels on this machine (a few seconds, at every start while {why})…"
)


@dataclass(frozen=True)
class CpuCheck:
    """Whether llama.cpp's extra CPU buffer types may be used on this machine, and why.

    `not_kept` says why a verdict just found could not be remembered (an unwritable home):
    it holds for this process, and the next start checks again.
    """

    status: Status
    detail: str = ""
    not_kept: str = ""

    @property
    def extra_bufts(self) -> bool:
        return self.status not in ("crashed", "forced-off")

    def describe(self) -> str:
        """One line for the plan's reasons and `qwenrun doctor`."""
        return self._verdict() + (
            f" (not remembered: {self.not_kept}, so it is checked again next time)"
            if self.not_kept
            else ""
        )

    def _verdict(self) -> str:
        if self.status == "crashed":
            return (
                "llama.cpp's extra CPU buffer types are off: their AMX kernels crash on this "
                f"CPU ({self.detail}); the plain kernels run instead, so CPU matmuls are "
                "slower and weights are not repacked"
            )
        if self.status == "forced-off":
            return (
                f"llama.cpp's extra CPU buffer types are off ({ENV_OVERRIDE}=0): CPU matmuls "
                "use the plain kernels, slower, and weights are not repacked"
            )
        if self.status == "forced-on":
            return f"llama.cpp's extra CPU buffer types are on ({ENV_OVERRIDE}=1), unchecked"
        if self.status == "ok":
            return f"llama.cpp's AMX kernels checked on this CPU: they work ({self.detail})"
        if self.status == "unchecked":
            return (
                f"llama.cpp's AMX kernels could not be checked ({self.detail}), so they stay "
                f"on; if qwenrun crashes on an illegal instruction, set {ENV_OVERRIDE}=0"
            )
        return "llama.cpp's CPU kernels: no AMX on this CPU, nothing to check"


# ------------------------------------------------------------------------------ the check


def _library_stamp() -> str:
    """Which llama.cpp build this is, without loading it: its library file's identity."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return "no-llama-cpp"
    if spec is None or spec.origin is None:
        return "no-llama-cpp"
    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(spec.origin).parent / "lib")
    libs = sorted(lib_dir.glob("libllama*")) if lib_dir.is_dir() else []
    if not libs:
        return f"{spec.origin}"
    st = libs[0].stat()
    return f"{libs[0]}:{st.st_size}:{st.st_mtime_ns}"


def check_key(cpu_model: str, cpu_flags: frozenset[str]) -> str:
    flags = ",".join(sorted(cpu_flags & (AMX_FLAGS | KERNEL_FLAGS)))
    return f"{cpu_model}|{flags}|{_library_stamp()}"


def _store() -> Path:
    return config.qwenrun_home() / "cpu-check.json"


def _read_store() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_store().read_text("utf-8"))
    except (OSError, ValueError):
        return {}  # missing, unreadable, half-written, or the home is no folder: check again
    return data if isinstance(data, dict) else {}


def _unwritable(folder: Path, exc: OSError) -> str:
    """Why `folder` cannot take a file, naming a file that stands where a folder should be."""
    for above in (folder, *folder.parents):
        if above.exists():
            if not above.is_dir():
                return f"{above} is a file, not a folder"
            break
    return f"{folder} cannot be written ({(exc.strerror or type(exc).__name__).lower()})"


def _store_problem() -> str | None:
    """Why a verdict could not be kept in the home, found before the probe runs (None: it
    can). Creating a file is the only test that holds for root and read-only mounts alike."""
    folder = _store().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return _unwritable(folder, exc)
    return None


def remember(key: str, check: CpuCheck) -> str | None:
    """Keep a verdict for this machine and build; returns why it could not be kept (an
    unwritable home only means checking again next time), or None."""
    data = _read_store()
    data[key] = {"status": check.status, "detail": check.detail}
    try:
        write_atomic(_store(), json.dumps(data, indent=1))
    except OSError as exc:
        return _unwritable(_store().parent, exc)
    return None


def recalled(key: str) -> CpuCheck | None:
    entry = _read_store().get(key)
    if not isinstance(entry, dict) or entry.get("status") not in ("ok", "crashed"):
        return None
    return CpuCheck(entry["status"], str(entry.get("detail", "")))  # type: ignore[arg-type]


def cpu_check(
    cpu_model: str,
    cpu_flags: frozenset[str],
    *,
    probe: Callable[[], CpuCheck] | None = None,
    checking: Callable[[str], AbstractContextManager[object]] | None = None,
) -> CpuCheck:
    """The verdict for this CPU and llama.cpp build: remembered, or probed once (AMX only).

    `probe` runs the check (default: `run_probe`, a child process); an "unchecked" result (a
    timeout, a probe that could not start) is not remembered. `checking(text)`
    is entered while the probe runs, so a start-up can say why it waits. The check needs no
    writable home: when the verdict cannot be kept there, it still decides for this process
    and says so in `not_kept`.
    """
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if forced in ("0", "off", "no", "false"):
        return CpuCheck("forced-off")
    if forced in ("1", "on", "yes", "true"):
        return CpuCheck("forced-on")
    key = check_key(cpu_model, cpu_flags)
    known = recalled(key)
    if known is not None:
        return known
    if not cpu_flags & AMX_FLAGS:
        return CpuCheck("no-amx")
    problem = _store_problem()
    text = CHECKING_AGAIN.format(why=problem) if problem else CHECKING
    with checking(text) if checking is not None else contextlib.nullcontext():
        found = (probe or run_probe)()
    if found.status == "unchecked":
        return found
    problem = problem or remember(key, found)
    return replace(found, not_kept=problem) if problem else found


def run_probe(command: list[str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> CpuCheck:
    """Run the probe child (or `command`) and judge how it ended: "ok" on a clean exit,
    "crashed" on death by a signal, "unchecked" (with the reason) otherwise.

    The child gets, as its last argument, a new folder in the system's temporary folder for
    its test model; this parent removes that folder whatever happened to the child (a child
    killed by a signal cleans up nothing itself).
    """
    argv = command or [sys.executable, "-m", "qwenrun.engine.crash", "probe"]
    try:
        folder = tempfile.mkdtemp(prefix=PROBE_PREFIX)
    except OSError as exc:
        return CpuCheck("unchecked", f"no temporary folder for its test model: {exc}")
    try:
        done = subprocess.run(
            [*argv, folder],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return CpuCheck("unchecked", f"the check did not finish in {timeout:.0f} s")
    except OSError as exc:
        return CpuCheck("unchecked", f"the check could not start: {exc}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode < 0:
        return CpuCheck("crashed", f"the check died with {_signal_name(-done.returncode)}")
    if done.returncode == 0:
        return CpuCheck("ok", "a K-quant model decoded with them")
    # Another failure (a broken install): its last words say more.
    said = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    why = f": {said[-1].strip()[:200]}" if said else ""
    return CpuCheck("unchecked", f"the check exited with status {done.returncode}{why}")


def _probe_main(folder: Path) -> int:
    """The child: a tiny Q4_K model, written into `folder` (the parent's, which the parent
    removes), loaded with the extra buffer types, decodes 4 tokens."""
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig
    from qwenrun.engine.values import SamplingParams
    from qwenrun.synthetic.tiny_gguf import Dims, write_model

    dims = Dims(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
    path = write_model(folder, "qwen3", n_layer=2, dtype="q4_k", steer=0, dims=dims)
    # The prompt cache would write into the home: this load has nothing to keep.
    with Engine.load(path, LoadConfig(n_ctx=256, extra_bufts=True, prompt_cache=0)) as engine:
        gen = engine.generate(
            engine.tokenize("The check of the CPU kernels"),
            SamplingParams(temperature=0.0),
            max_tokens=4,
        )
        gen.text()
    return 0


# ------------------------------------------------------------------------------ supervision


_WHAT: dict[int, tuple[str, str]] = {
    signal.SIGILL: (
        "llama.cpp crashed on an illegal instruction (SIGILL)",
        f"its build uses CPU instructions this machine refuses: run `qwenrun doctor`, or set "
        f"{ENV_OVERRIDE}=0 to use the plain CPU kernels",
    ),
    signal.SIGSEGV: (
        "qwenrun crashed (segmentation fault, SIGSEGV)",
        "run the same command with --verbose to see llama.cpp's log; `qwenrun doctor` checks "
        "the install",
    ),
    signal.SIGBUS: (
        "qwenrun crashed (bus error, SIGBUS): a memory-mapped model file changed or vanished",
        "do not modify or delete a model while it runs; check the disk and run it again",
    ),
    signal.SIGABRT: (
        "llama.cpp aborted (SIGABRT)",
        "run the same command with --verbose to see why in llama.cpp's log",
    ),
    signal.SIGFPE: (
        "qwenrun crashed on an arithmetic fault (SIGFPE)",
        "run the same command with --verbose to see llama.cpp's log",
    ),
    signal.SIGKILL: (
        "qwenrun was killed (SIGKILL), usually by the system running out of memory",
        "use a smaller quant or context (`qwenrun plan MODEL` shows what each needs), or close "
        "other programs",
    ),
}
# What a user or the terminal does on purpose: no message, only the shell's exit status.
_QUIET = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGQUIT})
_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
_SI_USER_CODES = frozenset({0, -1, -6})  # SI_USER, SI_QUEUE, SI_TKILL: sent by a process


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_death(signum: int) -> str:
    """The one line a user sees when qwenrun (or llama.cpp inside it) dies by `signum`."""
    what, hint = _WHAT.get(
        signum,
        (
            f"qwenrun stopped on {_signal_name(signum)}",
            "run the same command with --verbose to see llama.cpp's log",
        ),
    )
    return f"error: {what} (hint: {hint})"


def _death_line(pid: int, signum: int) -> str:
    """`describe_death`, or, when the child was using RPC workers and aborted, a line that
    says which worker no longer answers (engine/rpcrecord.py keeps the child's record of them)."""
    from qwenrun.engine import rpcrecord

    return rpcrecord.death_line(pid, signum) or describe_death(signum)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the supervising parent is killed (never orphaned)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(main: Callable[[], None]) -> None:
    """Run `main` in a child and report its death by a signal in one line (Linux only).

    Where the machinery is missing (not Linux, no `sigwaitinfo`) or `QWENRUN_NO_SUPERVISOR`
    is set, `main` simply runs here.
    """
    if (
        sys.platform != "linux"
        or not hasattr(signal, "sigwaitinfo")
        or os.environ.get("QWENRUN_NO_SUPERVISOR")
    ):
        main()
        return
    watched: set[int] = {*_FORWARD, signal.SIGCHLD}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        _die_with_parent()
        main()
        return
    _wait(pid, watched)


def _wait(pid: int, watched: set[int]) -> NoReturn:
    """The parent: forward what other processes send, then leave as the child left."""
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo != signal.SIGCHLD:
            # The terminal signals the whole foreground group (the child got it already);
            # a kill() aimed at this process must reach the child.
            if info.si_code in _SI_USER_CODES and info.si_pid != pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            continue  # stopped or continued (Ctrl-Z, fg): the child is still there
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            line = _death_line(pid, signum)
            if signum not in _QUIET:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            os._exit(128 + signum)
        os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        sys.exit(_probe_main(Path(sys.argv[2])))
    sys.exit(
        f"usage: python -m {__spec__.name if __spec__ else 'qwenrun.engine.crash'} probe FOLDER"
    )
