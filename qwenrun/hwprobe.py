"""What this machine has: GPUs, RAM, CPU, disk, memory bandwidth — as one frozen value.

Contract: `probe()` is where qwenrun reads the machine's hardware (NVML through nvidia-ml-py,
`nvidia-smi` as a fallback, psutil, /proc/cpuinfo, the cgroup memory limit, the disk of the
Hugging Face cache); llama.cpp's own view of its devices is `engine/devices.py`'s, and a
download checks its disk itself (`hub/transfer.py`). Everything else takes a `HardwareProfile`
value, so tests and `qwenrun plan --gpu-mem 24GiB` can describe machines that do not exist. A
missing driver, library or tool means "none of that here", never an exception.
`measure_cpu_bandwidth()` runs a short multi-threaded copy test and caches the figure in
QWENRUN_HOME; `probe()` uses a cached figure when it was measured on this CPU model. Whether the
installed llama.cpp can offload to a GPU is asked of `engine.native` (the only llama_cpp
importer) and only when `probe(check_backend=True)` finds a GPU, because it loads llama.cpp.
What qwenrun learns about the machine by running things on it (whether llama.cpp's extra CPU
kernels work, the speed `qwenrun bench` measured) is not read here: `machine.py` adds it to the
profile, with the `--rpc` workers' devices (`WorkerInfo`). `with_memory` describes another
machine for `qwenrun plan`: its GPUs' memory, its RAM, and hypothetical workers (`--worker`).
This module plans nothing and prints nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qwenrun import config
from qwenrun.atomic import write_atomic
from qwenrun.units import GIB, MIB

BandwidthSource = Literal["measured", "table", "default", "given"]


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: tuple[int, int] | None = None
    driver: str | None = None
    mem_bandwidth_gbs: float | None = None  # peak, GB/s (10^9 bytes)
    pcie: str | None = None  # e.g. "4.0 x16" (link generation and width)


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker (`qwenrun worker`) serves: a GPU, or the worker's RAM (its CPU)."""

    buffer: str  # llama.cpp's buffer type name, `RPC0[10.0.0.2:50052]`, stable across runs
    description: str
    is_cpu: bool  # the worker's CPU and RAM (a worker serves it last)
    total_bytes: int
    free_bytes: int
    bandwidth_gbs: float  # its memory's, GB/s (a table by name, or a conservative default)


@dataclass(frozen=True)
class WorkerInfo:
    """Another machine's devices, lent through llama.cpp's RPC backend."""

    endpoint: str  # "host:port"; a hypothetical worker's is "worker N"
    devices: tuple[RemoteDevice, ...]
    round_trip_s: float  # one request and its answer on the wire
    hypothetical: bool = False


@dataclass(frozen=True)
class HardwareProfile:
    """A machine, as the planner sees it. Build one by hand to plan for another machine."""

    gpus: tuple[GPUInfo, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    cpu_model: str
    physical_cores: int
    logical_cores: int
    cpu_flags: frozenset[str] = frozenset()
    disk_free_bytes: int | None = None
    cpu_bandwidth_gbs: float | None = None  # achievable read bandwidth of system RAM, GB/s
    gpu_offload: bool | None = None  # can the installed llama.cpp offload; None = not asked
    cpu_bandwidth_source: BandwidthSource = "default"
    notes: tuple[str, ...] = field(default=())  # what the probe could not tell
    # llama.cpp's extra CPU buffer types (repacked / AMX kernels) usable here; off where the
    # once-per-machine check saw them crash (engine/crash.py), with the reason in words.
    extra_bufts: bool = True
    cpu_kernels: str | None = None
    # The speed model's parameters fitted from this machine's `qwenrun bench` runs, as
    # (name, value) pairs; empty: the defaults calibrated on the H200 data.
    speed_params: tuple[tuple[str, float], ...] = ()
    # Other machines' devices this one may use (`--rpc`): read by the start-up
    # (`machine.py`), or described for `qwenrun plan --worker`.
    workers: tuple[WorkerInfo, ...] = ()

    @property
    def has_gpu(self) -> bool:
        """A GPU llama.cpp can use: present, and not known to be unusable by this build."""
        return bool(self.gpus) and self.gpu_offload is not False

    @property
    def vram_total_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_flags"] = sorted(self.cpu_flags)
        d["gpus"] = [
            {**asdict(g), "compute_capability": _cc_str(g.compute_capability)} for g in self.gpus
        ]
        d["notes"] = list(self.notes)
        return d


def _cc_str(cc: tuple[int, int] | None) -> str | None:
    return f"{cc[0]}.{cc[1]}" if cc else None


# --------------------------------------------------------------------------------------
# Bandwidth tables (GB/s, 10^9 bytes per second)

# Peak memory bandwidth by GPU name, for when NVML cannot give clock and bus width (the
# nvidia-smi path). Vendor data-sheet figures; the first matching fragment wins, so more
# specific names come first.
GPU_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIE", 2000.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIE", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX PRO 6000", 1792.0),
    ("RTX 6000 ADA", 960.0),
    ("RTX A6000", 768.0),
    ("RTX 5090", 1792.0),
    ("RTX 5080", 960.0),
    ("RTX 5070 TI", 896.0),
    ("RTX 5070", 672.0),
    ("RTX 5060 TI", 448.0),
    ("RTX 4090", 1008.0),
    ("RTX 4080", 717.0),
    ("RTX 4070 TI SUPER", 672.0),
    ("RTX 4070 TI", 504.0),
    ("RTX 4070", 504.0),
    ("RTX 4060 TI", 288.0),
    ("RTX 4060", 272.0),
    ("RTX 3090 TI", 1008.0),
    ("RTX 3090", 936.0),
    ("RTX 3080 TI", 912.0),
    ("RTX 3080", 760.0),
    ("RTX 3070", 448.0),
    ("RTX 3060 TI", 448.0),
    ("RTX 3060", 360.0),
    ("RTX 2080 TI", 616.0),
    ("RTX 2080", 448.0),
    ("TITAN RTX", 672.0),
    ("V100", 900.0),
    ("T4", 320.0),
)

# System-RAM bandwidth when it was not measured. The channel count and DIMM speed cannot be
# read without root (dmidecode), so these are deliberately low "achievable" figures for the
# smallest usual configuration of each CPU class: dual-channel for desktops, a few channels
# for servers. `qwenrun probe --measure` replaces them with a measurement.
CPU_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    (r"EPYC|Xeon|Threadripper|Ampere|Neoverse|Grace", 80.0),
    (r"Apple M\d (Max|Ultra)", 300.0),
    (r"Apple M\d Pro", 150.0),
    (r"Apple", 60.0),
)
DEFAULT_CPU_BANDWIDTH_GBS = 40.0  # dual-channel DDR4/DDR5 desktop, achievable
# One core cannot pull much more than this from RAM, so a small VM on a big server CPU
# gets (cores × this), not the whole socket's figure.
PER_CORE_BANDWIDTH_GBS = 12.0


def gpu_bandwidth_from_clock(mem_clock_mhz: float, bus_width_bits: int) -> float:
    """Peak GB/s from NVML's maximum memory clock and bus width.

    NVML reports the memory clock at half the data rate for GDDR6/6X/7 and HBM alike
    (RTX 4090: 10501 MHz × 384 bit → 1008 GB/s; H100 SXM: 2619 MHz × 5120 bit → 3352 GB/s),
    hence the factor 2.
    """
    return 2.0 * mem_clock_mhz * 1e6 * (bus_width_bits / 8) / 1e9


def gpu_bandwidth_from_name(name: str) -> float | None:
    upper = name.upper()
    for fragment, gbs in GPU_BANDWIDTH_GBS:
        if fragment in upper:
            return gbs
    return None


def default_cpu_bandwidth(cpu_model: str, cores: int) -> tuple[float, BandwidthSource]:
    """A conservative RAM bandwidth for a CPU that was not measured, and where it came from."""
    cap = max(1, cores) * PER_CORE_BANDWIDTH_GBS
    for pattern, gbs in CPU_BANDWIDTH_GBS:
        if re.search(pattern, cpu_model, re.IGNORECASE):
            return min(gbs, cap), "table"
    return min(DEFAULT_CPU_BANDWIDTH_GBS, cap), "default"


# --------------------------------------------------------------------------------------
# GPUs: NVML first, nvidia-smi second


def _nvml_gpus() -> tuple[GPUInfo, ...] | None:
    """The GPUs NVML sees; None when NVML (the driver's library) is not there."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        driver = _nvml_try(pynvml.nvmlSystemGetDriverVersion)
        count = pynvml.nvmlDeviceGetCount()
        return tuple(_nvml_gpu(pynvml, i, _text(driver)) for i in range(count))
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _nvml_try(fn: Any, *args: Any) -> Any:
    """One NVML query, or None when this GPU or driver does not support it."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_gpu(nv: Any, index: int, driver: str | None) -> GPUInfo:
    h = nv.nvmlDeviceGetHandleByIndex(index)
    name = _text(nv.nvmlDeviceGetName(h)) or f"GPU {index}"
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    cc = _nvml_try(nv.nvmlDeviceGetCudaComputeCapability, h)
    clock = _nvml_try(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM)
    bus = _nvml_try(nv.nvmlDeviceGetMemoryBusWidth, h)
    bandwidth = gpu_bandwidth_from_clock(clock, bus) if clock and bus else None
    gen = _nvml_try(nv.nvmlDeviceGetMaxPcieLinkGeneration, h)
    width = _nvml_try(nv.nvmlDeviceGetMaxPcieLinkWidth, h)
    return GPUInfo(
        index=index,
        name=name,
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        used_bytes=int(mem.used),
        compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
        driver=driver,
        mem_bandwidth_gbs=bandwidth or gpu_bandwidth_from_name(name),
        pcie=f"{gen}.0 x{width}" if gen and width else None,
    )


SMI_FIELDS = (
    "index",
    "name",
    "memory.total",
    "memory.free",
    "memory.used",
    "compute_cap",
    "driver_version",
    "pcie.link.gen.max",
    "pcie.link.width.max",
)
# Old drivers reject fields they do not know (compute_cap came late): ask for less then.
SMI_BASIC_FIELDS = (*SMI_FIELDS[:5], "driver_version")


def _smi_gpus() -> tuple[GPUInfo, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    for fields in (SMI_FIELDS, SMI_BASIC_FIELDS):
        cmd = [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ()
        if proc.returncode == 0:
            return parse_nvidia_smi(proc.stdout, fields)
    return ()


def parse_nvidia_smi(text: str, fields: tuple[str, ...] = SMI_FIELDS) -> tuple[GPUInfo, ...]:
    """GPUs from `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` output."""
    gpus: list[GPUInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = dict(zip(fields, (v.strip() for v in line.split(",")), strict=False))
        name = values.get("name") or "NVIDIA GPU"
        gpus.append(
            GPUInfo(
                index=_smi_int(values.get("index")) or len(gpus),
                name=name,
                total_bytes=(_smi_int(values.get("memory.total")) or 0) * MIB,
                free_bytes=(_smi_int(values.get("memory.free")) or 0) * MIB,
                used_bytes=(_smi_int(values.get("memory.used")) or 0) * MIB,
                compute_capability=_smi_cc(values.get("compute_cap")),
                driver=_smi_str(values.get("driver_version")),
                mem_bandwidth_gbs=gpu_bandwidth_from_name(name),
                pcie=_smi_pcie(values.get("pcie.link.gen.max"), values.get("pcie.link.width.max")),
            )
        )
    return tuple(gpus)


def _smi_str(value: str | None) -> str | None:
    # nvidia-smi writes "[N/A]" or "[Not Supported]" for fields it cannot read.
    if value is None or not value or value.startswith("["):
        return None
    return value


def _smi_int(value: str | None) -> int | None:
    text = _smi_str(value)
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


def _smi_cc(value: str | None) -> tuple[int, int] | None:
    text = _smi_str(value)
    if text is None or "." not in text:
        return None
    major, minor = text.split(".", 1)
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _smi_pcie(gen: str | None, width: str | None) -> str | None:
    g, w = _smi_int(gen), _smi_int(width)
    return f"{g}.0 x{w}" if g and w else None


def probe_gpus() -> tuple[GPUInfo, ...]:
    """NVIDIA GPUs: NVML, else nvidia-smi, else none."""
    gpus = _nvml_gpus()
    if gpus is None:
        gpus = _smi_gpus()
    return gpus


# --------------------------------------------------------------------------------------
# CPU, RAM, disk


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str]


def parse_cpuinfo(text: str) -> CPUInfo:
    """Model name and ISA flags from /proc/cpuinfo (x86 "flags", ARM "Features")."""
    model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return CPUInfo(model, flags)


def _cpu_info() -> CPUInfo:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    info = parse_cpuinfo(text)
    if not info.model:
        info = CPUInfo(platform.processor() or platform.machine() or "unknown CPU", info.flags)
    return info


def _cgroup_limit() -> int | None:
    """The container's memory limit, if one is set (psutil reports the host's RAM)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def _ram() -> tuple[int, int, int, str | None]:
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    note = None
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        used = total - available
        total = limit
        available = max(0, min(available, limit - used))
        note = f"RAM limited to {limit / GIB:.1f} GiB by this container's cgroup"
    return total, available, int(psutil.swap_memory().total), note


def cores() -> tuple[int, int]:
    """(physical, logical) cores, without the rest of `probe()` (NVML, disks, CPU flags)."""
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return int(physical), int(logical)


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest parent that exists (the HF cache may not exist yet)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_free(path: Path) -> int | None:
    try:
        return int(shutil.disk_usage(nearest_existing(path)).free)
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# CPU memory bandwidth: a short measurement, cached


def _bandwidth_cache() -> Path:
    return config.qwenrun_home() / "cpu_bandwidth.json"


def cached_cpu_bandwidth(cpu_model: str) -> float | None:
    """A measured figure for this CPU model, if `probe --measure` stored one."""
    try:
        data = json.loads(_bandwidth_cache().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("cpu_model") != cpu_model:
        return None
    value = data.get("gbs")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def measure_cpu_bandwidth(seconds: float = 0.4, threads: int | None = None) -> float:
    """Copy bandwidth of system RAM in GB/s (read + write bytes), over all cores.

    Each thread copies its own 32 MiB array (far larger than any cache) for about
    `seconds`; numpy releases the GIL while copying, so the threads run in parallel, as
    llama.cpp's do. This is the figure the decode-speed model divides CPU bytes by.
    """
    import numpy as np

    n = threads or cores()[0]
    elems = 32 * MIB // 8
    pairs = [(np.ones(elems), np.empty(elems)) for _ in range(n)]
    for src, dst in pairs:  # fault the pages in before timing
        np.copyto(dst, src)
    copied = [0] * n
    start = threading.Barrier(n + 1)

    def work(k: int, deadline_box: list[float]) -> None:
        src, dst = pairs[k]
        start.wait()
        while time.perf_counter() < deadline_box[0]:
            np.copyto(dst, src)
            copied[k] += 2 * src.nbytes

    box = [0.0]
    workers = [threading.Thread(target=work, args=(k, box)) for k in range(n)]
    for w in workers:
        w.start()
    box[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    return sum(copied) / elapsed / 1e9


def store_cpu_bandwidth(cpu_model: str, gbs: float) -> None:
    """Keep a measured figure for later probes (raises OSError when the home cannot take it)."""
    data = {"cpu_model": cpu_model, "gbs": round(gbs, 2), "measured_at": time.time()}
    write_atomic(_bandwidth_cache(), json.dumps(data))


# --------------------------------------------------------------------------------------
# The probe


def gpu_offload_supported() -> bool | None:
    """Can the installed llama.cpp offload to a GPU (None: its library does not load)."""
    try:
        from qwenrun.engine import native
    except ImportError:
        return None
    try:
        return native.supports_gpu_offload()
    except (ImportError, OSError, RuntimeError):
        return None  # llama.cpp's library did not load; `qwenrun doctor` explains why


def probe(check_backend: bool = False, *, measure: bool = False) -> HardwareProfile:
    """Read this machine. `measure=True` runs (and caches) the CPU bandwidth test;
    `check_backend=True` asks the installed llama.cpp whether it can use the GPUs found."""
    cpu = _cpu_info()
    physical, logical = cores()
    total, available, swap, ram_note = _ram()
    notes = [ram_note] if ram_note else []
    if measure:
        gbs: float = round(measure_cpu_bandwidth(), 2)  # as stored, so later probes agree
        try:
            store_cpu_bandwidth(cpu.model, gbs)
        except OSError as exc:
            notes.append(
                f"measured RAM bandwidth not kept for later runs: {config.qwenrun_home()} "
                f"cannot be written ({exc.strerror or exc})"
            )
        source: BandwidthSource = "measured"
    elif (cached := cached_cpu_bandwidth(cpu.model)) is not None:
        gbs, source = cached, "measured"
    else:
        gbs, source = default_cpu_bandwidth(cpu.model, physical)
        notes.append(
            f"RAM bandwidth {gbs:.0f} GB/s is a conservative default (memory channels "
            "unknown); `qwenrun probe --measure` measures it"
        )
    gpus = probe_gpus()
    return HardwareProfile(
        gpus=gpus,
        ram_total_bytes=total,
        ram_available_bytes=available,
        swap_total_bytes=swap,
        cpu_model=cpu.model,
        physical_cores=physical,
        logical_cores=logical,
        cpu_flags=cpu.flags,
        disk_free_bytes=disk_free(config.hf_hub_cache()),
        cpu_bandwidth_gbs=gbs,
        # Only a GPU makes the question worth loading llama.cpp for.
        gpu_offload=gpu_offload_supported() if check_backend and gpus else None,
        cpu_bandwidth_source=source,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------
# Hypothetical machines ("what would a 24 GB card give me?")

# Assumed for a GPU that exists only in a `--gpu-mem` question: a mid-range card's peak.
HYPOTHETICAL_GPU_BANDWIDTH_GBS = 500.0
# Assumed for a hypothetical worker: a request and its answer over a local network (1-10 GbE
# with a switch: 0.1-0.5 ms; loopback measures 0.02 ms).
HYPOTHETICAL_ROUND_TRIP_S = 0.0005


def with_memory(
    hw: HardwareProfile,
    gpu_bytes: int | Sequence[int] | None = None,
    ram_bytes: int | None = None,
    workers: Sequence[tuple[Sequence[int], int]] = (),
) -> HardwareProfile:
    """`hw` with its GPU memory and/or RAM replaced, for planning another machine.

    `gpu_bytes` is one size or one per GPU; `0` (or an empty list) removes the GPUs. Sizes
    replace the real GPUs' memory in order (all free), and a size without a real GPU makes a
    hypothetical one (bandwidth assumed, `HYPOTHETICAL_GPU_BANDWIDTH_GBS`); GPUs beyond the
    sizes given are dropped. `ram_bytes` sets total and available RAM alike. `workers` adds
    hypothetical workers, each (its GPUs' sizes, its RAM), after any real ones.
    """
    out = hw
    if gpu_bytes is not None:
        sizes = [gpu_bytes] if isinstance(gpu_bytes, int) else list(gpu_bytes)
        sizes = [s for s in sizes if s > 0]
        # Other GPUs: this machine's measured speed calibration does not carry over.
        out = replace(out, gpus=_gpus_with(hw.gpus, sizes), speed_params=())
        if sizes:
            # The question is "what would this GPU give me", not "can my build use one".
            out = replace(out, gpu_offload=None)
    if ram_bytes is not None:
        out = replace(out, ram_total_bytes=ram_bytes, ram_available_bytes=ram_bytes)
    if workers:
        start = len(out.workers)
        made = tuple(
            hypothetical_worker(start + i, gpus, ram) for i, (gpus, ram) in enumerate(workers)
        )
        out = replace(out, workers=(*out.workers, *made))
    return out


def _gpus_with(gpus: tuple[GPUInfo, ...], sizes: Sequence[int]) -> tuple[GPUInfo, ...]:
    out = []
    for i, size in enumerate(sizes):
        if i < len(gpus):
            out.append(replace(gpus[i], total_bytes=size, free_bytes=size, used_bytes=0))
            continue
        out.append(
            GPUInfo(
                index=i,
                name=f"hypothetical {size / GIB:g} GiB GPU",
                total_bytes=size,
                free_bytes=size,
                used_bytes=0,
                mem_bandwidth_gbs=HYPOTHETICAL_GPU_BANDWIDTH_GBS,
                pcie="4.0 x16",
            )
        )
    return tuple(out)


def hypothetical_worker(n: int, gpus: Sequence[int], ram: int) -> WorkerInfo:
    """Worker `n` of a `qwenrun plan --worker` question: GPUs of these sizes and this RAM."""
    endpoint = f"worker {n + 1}"
    devices = [
        RemoteDevice(
            f"RPC{i}[{endpoint}]",
            f"{size / GIB:g} GiB GPU",
            False,
            size,
            size,
            HYPOTHETICAL_GPU_BANDWIDTH_GBS,
        )
        for i, size in enumerate(s for s in gpus if s > 0)
    ]
    cpu_gbs, _ = default_cpu_bandwidth("", 16)
    devices.append(
        RemoteDevice(f"RPC{len(devices)}[{endpoint}]", "its RAM", True, ram, ram, cpu_gbs)
    )
    return WorkerInfo(endpoint, tuple(devices), HYPOTHETICAL_ROUND_TRIP_S, hypothetical=True)
