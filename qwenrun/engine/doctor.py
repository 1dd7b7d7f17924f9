"""`qwenrun doctor`: can this machine's llama.cpp use its GPU, and if not, how to fix that.

Contract: `diagnose(hw, llama_version, gpu_offload)` is pure. From a `HardwareProfile` value,
the installed llama-cpp-python version and whether its llama.cpp can offload to a GPU, it
builds a `Diagnosis`: findings at levels ok / warn / error, in words, and the one shell
command that fixes the worst of them. `cuda_warning(hw, gpu_offload)` is the line `run` and
`chat` print (once) when an NVIDIA GPU sits unused under a CPU-only build. `collect()` is the
only function here that reads the machine, through `hwprobe.probe()`, the installed
distributions' metadata and `engine.native.supports_gpu_offload()` (the one call that loads
llama.cpp). Nothing here prints.

The llama-cpp-python version in the fix commands is the one qwenrun's own metadata pins
(pyproject.toml is the single source of truth; the engine's ctypes layouts are those of that
release). In a source checkout without metadata it falls back to the installed version.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from qwenrun.units import GIB

if TYPE_CHECKING:
    from qwenrun.hwprobe import GPUInfo, HardwareProfile

Level = Literal["ok", "warn", "error"]
_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "error": 2}

LLAMA_DIST = "llama-cpp-python"
# "llama-cpp-python==0.3.36" (PEP 503 spellings of the name included; markers ignored).
_PIN_RE = re.compile(r"^\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;,]+)", re.IGNORECASE)


@functools.cache
def pinned_llama_version() -> str | None:
    """The llama-cpp-python version qwenrun's installed metadata pins, if it can be read."""
    try:
        requirements = metadata.requires("qwenrun") or []
    except metadata.PackageNotFoundError:
        return None  # running from a source tree that was never installed
    for req in requirements:
        match = _PIN_RE.match(req)
        if match:
            return match.group(1)
    return None


def installed_llama_version() -> str | None:
    """The installed llama-cpp-python's version, read without importing it."""
    try:
        return metadata.version(LLAMA_DIST)
    except metadata.PackageNotFoundError:
        return None


def _spec(version: str | None) -> str:
    return f"{LLAMA_DIST}=={version}" if version else LLAMA_DIST


def cuda_install_command(version: str | None) -> str:
    """The command that rebuilds llama-cpp-python with llama.cpp's CUDA backend."""
    return 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir ' + _spec(
        version
    )


def cpu_install_command(version: str | None) -> str:
    return "pip install --force-reinstall --no-cache-dir " + _spec(version)


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
) -> Diagnosis:
    """What is right and wrong with this machine's setup for qwenrun.

    `pinned` defaults to the version qwenrun's metadata pins. `offload_error` says why
    `gpu_offload` could not be checked (llama.cpp's library did not load), when it is None.
    """
    pin = pinned or pinned_llama_version()
    findings = [
        _llama_finding(hw, llama_version, pin),
        *_offload_findings(hw, llama_version, gpu_offload, pin, offload_error),
        *_gpu_findings(hw),
        _host_finding(hw),
        *_kernel_findings(hw),
        # What the probe could not tell (e.g. an unmeasured RAM bandwidth): said, not judged.
        *(Finding("ok", "probe", f"note: {note}") for note in hw.notes),
    ]
    return Diagnosis(llama_version, pin, gpu_offload, tuple(hw.gpus), tuple(findings))


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


def _kernel_findings(hw: HardwareProfile) -> list[Finding]:
    """The once-per-machine check of llama.cpp's CPU kernels (engine/crash.py), when made."""
    if hw.cpu_kernels is None:
        return []
    # Off is not an error: qwenrun runs, with the plain (slower) kernels. It is worth a look.
    return [Finding("ok" if hw.extra_bufts else "warn", "cpu-kernels", hw.cpu_kernels)]


# --------------------------------------------------------------------------------------
# Rendering and the machine


def render_text(d: Diagnosis) -> str:
    """The plain-text report `qwenrun doctor` prints: one line per finding, then the fix."""
    lines = [f"{f.level:<5}  {f.text}" for f in d.findings]
    if d.fix:
        lines += ["", "To fix it, run:", f"  {d.fix}"]
    return "\n".join(lines) + "\n"


def collect() -> Diagnosis:
    """Read this machine and diagnose it (the only function here with side effects)."""
    from qwenrun import hwprobe

    version = installed_llama_version()
    # With llama.cpp installed, also check its CPU kernels (on AMX CPUs: once, in a child).
    hw = hwprobe.probe(check_backend=version is not None)
    offload, error = _check_offload() if version else (None, None)
    return diagnose(hw, version, offload, offload_error=error)


def _check_offload() -> tuple[bool | None, str | None]:
    from qwenrun.engine import native

    try:
        return native.supports_gpu_offload(), None
    except (ImportError, OSError, RuntimeError) as err:
        # A broken install (a missing or mismatched libllama) is exactly what doctor is
        # for: report it as a finding instead of failing.
        return None, f"{type(err).__name__}: {err}"
