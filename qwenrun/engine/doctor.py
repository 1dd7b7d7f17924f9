"""`qwenrun doctor`: can this machine's llama.cpp use its GPU (and workers), and how to fix that.

Contract: `diagnose(hw, llama_version, gpu_offload, rpc=...)` is pure. From a
`HardwareProfile` value, the installed llama-cpp-python version, whether its llama.cpp can
offload to a GPU and whether it has the RPC backend (workers), it builds a `Diagnosis`:
findings at levels ok / warn / error, in words, and the one shell command that fixes the worst
of them. Every rebuild command asks for RPC too, and for CUDA where an NVIDIA GPU is present,
and defeats pip's wheel cache (which would hand back the old build of the same version).
`cuda_warning(hw, gpu_offload)` is the line `run` and `chat` print (once) when an NVIDIA GPU
sits unused under a CPU-only build. `collect()` is the only function here that reads the
machine, through `hwprobe.probe()`, the installed distributions' metadata and
`engine.native` (`supports_gpu_offload()`, `supports_rpc()`: the calls that load llama.cpp)
and `engine.crash.cpu_check` (the check of llama.cpp's CPU kernels, whose verdict `diagnose`
takes as `kernels=`). Nothing here prints.

The llama-cpp-python version in the fix commands is the one qwenrun's own metadata pins
(pyproject.toml is the single source of truth; the engine's ctypes layouts are those of that
release). In a source checkout without metadata it falls back to the installed version.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from qwenrun.engine import crash
from qwenrun.engine.crash import AMX_FLAGS, CpuCheck

# The install commands live apart (the RPC client needs them too); doctor's names stay.
from qwenrun.engine.rebuild import (
    LLAMA_DIST,
    cpu_install_command,
    cuda_install_command,
    installed_llama_version,
    keeps_cuda,
    pinned_llama_version,
    rpc_install_command,
)
from qwenrun.units import GIB

if TYPE_CHECKING:
    from qwenrun.hwprobe import GPUInfo, HardwareProfile

Level = Literal["ok", "warn", "error"]
_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "error": 2}

# --------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Finding:
    level: Level
    topic: str  # "llama-cpp-python", "gpu-offload", "gpu", "host", "cpu-kernels", "probe"
    text: str
    fix: str | None = None  # a shell command, when one fixes it


@dataclass(frozen=True)
class Diagnosis:
    llama_version: str | None
    pinned_version: str | None
    gpu_offload: bool | None
    gpus: tuple[GPUInfo, ...]
    findings: tuple[Finding, ...]
    rpc: bool | None = None  # built with llama.cpp's RPC backend; None = not asked

    @property
    def level(self) -> Level:
        return max((f.level for f in self.findings), key=_SEVERITY.__getitem__, default="ok")

    @property
    def ok(self) -> bool:
        """No error: qwenrun can run (warnings may still cost speed)."""
        return self.level != "error"

    @property
    def fix(self) -> str | None:
        """The command that fixes the most severe finding that has one."""
        fixable = [f for f in self.findings if f.fix]
        if not fixable:
            return None
        return max(fixable, key=lambda f: _SEVERITY[f.level]).fix

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "level": self.level,
            "llama_cpp_python": {"installed": self.llama_version, "pinned": self.pinned_version},
            "gpu_offload": self.gpu_offload,
            "rpc": self.rpc,
            "gpus": [asdict(g) for g in self.gpus],
            "findings": [asdict(f) for f in self.findings],
            "fix": self.fix,
        }


# --------------------------------------------------------------------------------------
# The pure core


def diagnose(
    hw: HardwareProfile,
    llama_version: str | None,
    gpu_offload: bool | None,
    *,
    pinned: str | None = None,
    offload_error: str | None = None,
    rpc: bool | None = None,
    kernels: CpuCheck | None = None,
) -> Diagnosis:
    """What is right and wrong with this machine's setup for qwenrun.

    `pinned` defaults to the version qwenrun's metadata pins. `offload_error` says why
    `gpu_offload` could not be checked (llama.cpp's library did not load), when it is None.
    `rpc`: whether the build has llama.cpp's RPC backend (None: not asked, not reported).
    `kernels`: the verdict of the check of llama.cpp's CPU kernels (`engine.crash`), None when
    it was not made.
    """
    pin = pinned or pinned_llama_version()
    findings = [
        _llama_finding(hw, llama_version, pin),
        *_offload_findings(hw, llama_version, gpu_offload, pin, offload_error),
        *_rpc_findings(hw, llama_version, gpu_offload, pin, rpc),
        *_gpu_findings(hw),
        _host_finding(hw),
        _kernel_finding(hw, kernels, llama_version),
        # What the probe could not tell (e.g. an unmeasured RAM bandwidth): said, not judged.
        *(Finding("ok", "probe", f"note: {note}") for note in hw.notes),
    ]
    return Diagnosis(llama_version, pin, gpu_offload, tuple(hw.gpus), tuple(findings), rpc)


def cuda_warning(hw: HardwareProfile, gpu_offload: bool | None) -> str | None:
    """One line for `run`/`chat` when an NVIDIA GPU is present but llama.cpp is CPU-only."""
    if gpu_offload is not False or not hw.gpus:
        return None
    version = pinned_llama_version() or installed_llama_version()
    return (
        f"warning: this llama.cpp build is CPU-only, so {_gpu_names(hw)} stays unused. "
        f"Rebuild it with CUDA: {cuda_install_command(version)}"
    )


def _gpu_names(hw: HardwareProfile) -> str:
    names = sorted({g.name for g in hw.gpus})
    if len(hw.gpus) == 1:
        return f"the {names[0]}"
    return f"{len(hw.gpus)} NVIDIA GPUs ({', '.join(names)})"


def _install(hw: HardwareProfile, version: str | None) -> str:
    # With an NVIDIA GPU present, any (re)install should be the CUDA build.
    return cuda_install_command(version) if hw.gpus else cpu_install_command(version)


def _llama_finding(hw: HardwareProfile, version: str | None, pin: str | None) -> Finding:
    topic = LLAMA_DIST
    if version is None:
        return Finding("error", topic, "llama-cpp-python is not installed", _install(hw, pin))
    if pin and version != pin:
        return Finding(
            "warn",
            topic,
            f"llama-cpp-python {version} is installed, but qwenrun is built for {pin} "
            "(the engine relies on that release's C structures)",
            _install(hw, pin),
        )
    suffix = " (the version qwenrun pins)" if pin else ""
    return Finding("ok", topic, f"llama-cpp-python {version}{suffix}")


def _offload_findings(
    hw: HardwareProfile,
    version: str | None,
    gpu_offload: bool | None,
    pin: str | None,
    offload_error: str | None,
) -> list[Finding]:
    topic = "gpu-offload"
    if version is None:
        return []  # nothing to check; the install finding already says what to do
    if gpu_offload is None:
        reason = f": {offload_error}" if offload_error else ""
        return [
            Finding(
                "error" if offload_error else "warn",
                topic,
                f"could not ask llama.cpp whether it can use a GPU{reason}",
                _install(hw, pin or version) if offload_error else None,
            )
        ]
    if gpu_offload:
        extra = "" if hw.gpus else " (NVML sees no NVIDIA GPU; other GPU backends are not listed)"
        return [Finding("ok", topic, f"llama.cpp is built with a GPU backend{extra}")]
    if hw.gpus:
        return [
            Finding(
                "warn",
                topic,
                f"llama.cpp is a CPU-only build, so {_gpu_names(hw)} stays unused: "
                "models run several times slower than they could",
                cuda_install_command(pin or version),
            )
        ]
    return [Finding("ok", topic, "llama.cpp is a CPU-only build, and there is no GPU to use")]


def _rpc_findings(
    hw: HardwareProfile,
    version: str | None,
    gpu_offload: bool | None,
    pin: str | None,
    rpc: bool | None,
) -> list[Finding]:
    if version is None or rpc is None:
        return []
    if rpc:
        return [
            Finding(
                "ok",
                "rpc",
                "llama.cpp has the RPC backend: `qwenrun worker` and --rpc can use other "
                "machines' GPUs and RAM",
            )
        ]
    # Not an error: one machine needs no RPC. The rebuild keeps a GPU build a GPU build (and
    # makes a CPU-only build with a GPU present a CUDA one, as the offload finding asks).
    cuda = keeps_cuda(bool(gpu_offload), bool(hw.gpus))
    return [
        Finding(
            "ok",
            "rpc",
            "llama.cpp is built without the RPC backend, which `qwenrun worker` and --rpc "
            "(other machines' GPUs and RAM) need",
            rpc_install_command(pin or version, cuda=cuda),
        )
    ]


def _gpu_findings(hw: HardwareProfile) -> list[Finding]:
    if not hw.gpus:
        return [Finding("ok", "gpu", "no NVIDIA GPU found (NVML): models run on the CPU")]
    return [Finding("ok", "gpu", _describe_gpu(g)) for g in hw.gpus]


def _describe_gpu(g: GPUInfo) -> str:
    parts = [f"GPU {g.index}: {g.name}, {g.total_bytes / GIB:.1f} GiB"]
    parts[0] += f" ({g.free_bytes / GIB:.1f} GiB free)"
    if g.compute_capability:
        parts.append(f"compute {g.compute_capability[0]}.{g.compute_capability[1]}")
    if g.driver:
        parts.append(f"driver {g.driver}")
    return ", ".join(parts)


def _host_finding(hw: HardwareProfile) -> Finding:
    simd = [f for f in ("avx2", "avx512f", "amx_tile") if f in hw.cpu_flags]
    flags = f", {' '.join(simd)}" if simd else ""
    return Finding(
        "ok",
        "host",
        f"CPU: {hw.cpu_model}, {hw.physical_cores} cores / {hw.logical_cores} threads{flags}; "
        f"RAM {hw.ram_total_bytes / GIB:.1f} GiB ({hw.ram_available_bytes / GIB:.1f} GiB free)",
    )


# How much each verdict of the CPU kernel check is worth a look. Off is not an error: qwenrun
# runs, with the plain (slower) kernels; AMX kernels nobody could check may still crash.
_KERNEL_LEVEL: dict[str, Level] = {
    "ok": "ok",
    "no-amx": "ok",
    "forced-on": "ok",
    "crashed": "warn",
    "forced-off": "warn",
    "unchecked": "warn",
}


def _kernel_finding(
    hw: HardwareProfile, kernels: CpuCheck | None, llama_version: str | None
) -> Finding:
    """The check of llama.cpp's CPU kernels (engine/crash.py) in words that are true for this
    CPU: a CPU that lists AMX is never said to have none."""
    topic = "cpu-kernels"
    if kernels is not None:
        return Finding(_KERNEL_LEVEL[kernels.status], topic, kernels.describe())
    if not hw.cpu_flags & AMX_FLAGS:
        return Finding("ok", topic, CpuCheck("no-amx").describe())
    why = "llama-cpp-python is not installed" if llama_version is None else "not asked"
    return Finding("ok", topic, f"llama.cpp's AMX kernels: not checked ({why})")


# --------------------------------------------------------------------------------------
# Rendering and the machine


def render_text(d: Diagnosis) -> str:
    """The plain-text report `qwenrun doctor` prints: one line per finding, then the fix."""
    lines = [f"{f.level:<5}  {f.text}" for f in d.findings]
    if d.fix:
        lines += ["", "To fix it, run:", f"  {d.fix}"]
    return "\n".join(lines) + "\n"


def collect(checking: Callable[[str], AbstractContextManager[object]] | None = None) -> Diagnosis:
    """Read this machine and diagnose it (the only function here with side effects);
    `checking(text)` is entered while the CPU kernel check runs its child."""
    from qwenrun import hwprobe

    version = installed_llama_version()
    hw = hwprobe.probe(check_backend=version is not None)
    # With llama.cpp installed, also check its CPU kernels (on AMX CPUs: once, in a child;
    # again on each call where the home cannot keep the verdict).
    kernels = crash.cpu_check(hw.cpu_model, hw.cpu_flags, checking=checking) if version else None
    offload, error = _check_offload() if version else (None, None)
    rpc = _check_rpc() if version and error is None else None
    return diagnose(hw, version, offload, offload_error=error, rpc=rpc, kernels=kernels)


def _check_offload() -> tuple[bool | None, str | None]:
    from qwenrun.engine import native

    try:
        return native.supports_gpu_offload(), None
    except (ImportError, OSError, RuntimeError) as err:
        # A broken install (a missing or mismatched libllama) is exactly what doctor is
        # for: report it as a finding instead of failing.
        return None, f"{type(err).__name__}: {err}"


def _check_rpc() -> bool | None:
    from qwenrun.engine import native

    try:
        return native.supports_rpc()
    except (ImportError, OSError, RuntimeError):
        return None  # the offload check already reports a library that does not load
