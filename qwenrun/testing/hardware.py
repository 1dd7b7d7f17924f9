"""Machines as values, for planner tests: hardware is faked at the boundary, never probed.

Contract: builds `HardwareProfile`s for hypothetical machines ("12 GiB GPU + 32 GiB RAM",
"no GPU"); reads nothing from the machine it runs on.
"""

from __future__ import annotations

from qwenrun.hwprobe import GIB, GPUInfo, HardwareProfile


def gpu(gib: float, bandwidth: float = 1000.0) -> GPUInfo:
    """An NVIDIA-like GPU of `gib` GiB, all of it free."""
    size = int(gib * GIB)
    return GPUInfo(0, f"test GPU {gib:g} GiB", size, size, 0, (8, 9), "550", bandwidth, "4.0 x16")


def machine(
    gpu_gib: float | None,
    ram_gib: float,
    *,
    cpu_gbs: float = 60.0,
    offload: bool | None = None,
) -> HardwareProfile:
    """A 16-core machine with this much RAM and, unless `gpu_gib` is None, one GPU.

    `offload` is whether llama.cpp can use the GPU (None: not asked, as the planner's tests
    need; False: a CPU-only build beside the GPU).
    """
    ram = int(ram_gib * GIB)
    return HardwareProfile(
        gpus=() if gpu_gib is None else (gpu(gpu_gib),),
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        swap_total_bytes=0,
        cpu_model="test CPU",
        physical_cores=16,
        logical_cores=32,
        cpu_flags=frozenset({"avx2", "fma"}),
        disk_free_bytes=None,
        cpu_bandwidth_gbs=cpu_gbs,
        gpu_offload=offload,
        cpu_bandwidth_source="measured",
    )
