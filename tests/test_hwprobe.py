"""hwprobe: parsers, bandwidth rules, the cache, hypothetical machines, and this machine."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qwenrun import hwprobe
from qwenrun.hwprobe import GPUInfo, HardwareProfile
from qwenrun.units import GIB, MIB

SMI_TWO_GPUS = """\
0, NVIDIA GeForce RTX 4090, 24564, 23000, 1564, 8.9, 550.54.14, 4, 16
1, NVIDIA H100 80GB HBM3, 81559, [N/A], 0, 9.0, 550.54.14, [Not Supported], 16
"""

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 9 7950X 16-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni
processor\t: 1
model name\t: AMD Ryzen 9 7950X 16-Core Processor
flags\t\t: fpu sse2
"""


def test_parse_nvidia_smi_reads_every_field_and_tolerates_na():
    a, b = hwprobe.parse_nvidia_smi(SMI_TWO_GPUS)
    assert a == GPUInfo(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        total_bytes=24564 * MIB,
        free_bytes=23000 * MIB,
        used_bytes=1564 * MIB,
        compute_capability=(8, 9),
        driver="550.54.14",
        mem_bandwidth_gbs=1008.0,
        pcie="4.0 x16",
    )
    assert b.index == 1
    assert b.free_bytes == 0  # "[N/A]" reads as unknown, not as a crash
    assert b.pcie is None
    assert b.compute_capability == (9, 0)
    assert b.mem_bandwidth_gbs == 3350.0


def test_parse_nvidia_smi_with_the_basic_field_set():
    (g,) = hwprobe.parse_nvidia_smi(
        "0, Tesla T4, 15360, 15000, 360, 470.1\n", hwprobe.SMI_BASIC_FIELDS
    )
    assert g.total_bytes == 15360 * MIB
    assert g.driver == "470.1"
    assert g.compute_capability is None
    assert g.mem_bandwidth_gbs == 320.0


def test_parse_cpuinfo_takes_the_first_model_and_flags():
    info = hwprobe.parse_cpuinfo(CPUINFO)
    assert info.model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert {"avx2", "avx512f", "avx512_vnni"} <= info.flags
    assert hwprobe.parse_cpuinfo("").model == ""


def test_gpu_bandwidth_from_nvml_clock_and_bus_width():
    assert hwprobe.gpu_bandwidth_from_clock(10501, 384) == pytest.approx(1008, rel=0.01)
    assert hwprobe.gpu_bandwidth_from_clock(2619, 5120) == pytest.approx(3352, rel=0.01)


def test_gpu_bandwidth_table_prefers_the_most_specific_name():
    assert hwprobe.gpu_bandwidth_from_name("NVIDIA GeForce RTX 4070 Ti SUPER") == 672.0
    assert hwprobe.gpu_bandwidth_from_name("NVIDIA GeForce RTX 4070") == 504.0
    assert hwprobe.gpu_bandwidth_from_name("NVIDIA H100 PCIe") == 2000.0
    assert hwprobe.gpu_bandwidth_from_name("Some Future GPU") is None


def test_default_cpu_bandwidth_is_capped_by_cores_and_says_where_it_came_from():
    assert hwprobe.default_cpu_bandwidth("AMD EPYC 9554", 64) == (80.0, "table")
    # A 2-core VM on a server CPU cannot use the socket's bandwidth.
    gbs, source = hwprobe.default_cpu_bandwidth("AMD EPYC", 2)
    assert gbs == 2 * hwprobe.PER_CORE_BANDWIDTH_GBS
    assert source == "table"
    assert hwprobe.default_cpu_bandwidth("Intel Core i7-12700K", 12) == (40.0, "default")


def test_measured_bandwidth_is_cached_per_cpu_model():
    assert hwprobe.cached_cpu_bandwidth("CPU A") is None
    hwprobe.store_cpu_bandwidth("CPU A", 55.5)
    assert hwprobe.cached_cpu_bandwidth("CPU A") == 55.5
    assert hwprobe.cached_cpu_bandwidth("CPU B") is None  # another CPU: not trusted


def test_measure_cpu_bandwidth_gives_a_plausible_figure():
    gbs = hwprobe.measure_cpu_bandwidth(seconds=0.05, threads=1)
    assert 0.5 < gbs < 2000


def test_nearest_existing_parent_and_disk_free(tmp_path: Path):
    missing = tmp_path / "not" / "yet" / "there"
    assert hwprobe.nearest_existing(missing) == tmp_path
    free = hwprobe.disk_free(missing)
    assert free is not None and free > 0


def test_probe_reads_this_machine_without_raising():
    hw = hwprobe.probe()
    assert hw.ram_total_bytes > 0
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert 1 <= hw.physical_cores <= hw.logical_cores
    assert hw.cpu_model
    assert hw.cpu_bandwidth_gbs is not None and hw.cpu_bandwidth_gbs > 0
    assert hw.gpu_offload is None  # not asked: llama.cpp was not loaded for it
    assert hw.disk_free_bytes is not None
    for g in hw.gpus:
        assert g.total_bytes >= g.free_bytes


def test_probe_uses_the_cached_measurement():
    cpu = hwprobe.probe().cpu_model
    hwprobe.store_cpu_bandwidth(cpu, 123.0)
    hw = hwprobe.probe()
    assert hw.cpu_bandwidth_gbs == 123.0
    assert hw.cpu_bandwidth_source == "measured"


@pytest.mark.skipif(hwprobe._nvml_gpus() is not None, reason="NVML present: smi is not used")
def test_probe_falls_back_to_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # No NVIDIA driver here, so a stand-in nvidia-smi on PATH plays the driver's tool.
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI_TWO_GPUS}EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpus = hwprobe.probe().gpus
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"]


def test_probe_without_any_gpu_tool_finds_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if hwprobe._nvml_gpus() is not None:
        pytest.skip("this machine has NVML")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert hwprobe.probe_gpus() == ()


def _machine(*gpus: GPUInfo) -> HardwareProfile:
    return HardwareProfile(
        gpus=gpus,
        ram_total_bytes=64 * GIB,
        ram_available_bytes=60 * GIB,
        swap_total_bytes=0,
        cpu_model="x",
        physical_cores=8,
        logical_cores=16,
    )


def test_with_memory_builds_hypothetical_machines():
    cpu_only = _machine()
    hyp = hwprobe.with_memory(cpu_only, gpu_bytes=24 * GIB, ram_bytes=32 * GIB)
    (g,) = hyp.gpus
    assert g.total_bytes == g.free_bytes == 24 * GIB
    assert g.mem_bandwidth_gbs == hwprobe.HYPOTHETICAL_GPU_BANDWIDTH_GBS
    assert hyp.ram_total_bytes == hyp.ram_available_bytes == 32 * GIB
    assert hyp.has_gpu

    real = _machine(
        GPUInfo(0, "NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB, 4 * GIB, (8, 9), None, 1008.0)
    )
    resized = hwprobe.with_memory(real, gpu_bytes=12 * GIB)
    assert resized.gpus[0].name == "NVIDIA GeForce RTX 4090"
    assert resized.gpus[0].free_bytes == 12 * GIB
    assert resized.gpus[0].mem_bandwidth_gbs == 1008.0
    assert hwprobe.with_memory(real, gpu_bytes=0).gpus == ()


def test_a_gpu_the_build_cannot_use_does_not_count():
    gpu = GPUInfo(0, "NVIDIA GeForce RTX 4090", 24 * GIB, 24 * GIB, 0)
    hw = _machine(gpu)
    assert hw.has_gpu
    from dataclasses import replace

    assert not replace(hw, gpu_offload=False).has_gpu


def test_to_dict_is_json_ready():
    import json

    gpu = GPUInfo(0, "NVIDIA H100", 80 * GIB, 80 * GIB, 0, (9, 0), "580", 3350.0, "5.0 x16")
    d = _machine(gpu).to_dict()
    json.dumps(d)
    assert d["gpus"][0]["compute_capability"] == "9.0"
