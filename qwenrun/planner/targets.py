"""The devices a plan can put bytes on, each with its own budget: `Target`s.

Contract: pure. `targets_of(hw)` lists, in this order, this machine's GPUs (each its free
memory, less the CUDA context and llama.cpp's margin), this machine's RAM (available now, less
the OS's share), then each worker's devices as it reported them (`hw.workers`: its GPUs, less
the same margins; its RAM, less the OS's share of it). A `Target` says which machine it is on
(`machine`: "" for this one, else the worker's endpoint), whether it is that machine's RAM,
the name llama.cpp's placement uses for it (`buffer`: CUDA0, CPU, RPC1[host:port]) and the
bandwidth of its memory. Swap never counts: weights paged out to disk would run at disk speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwenrun.hwprobe import HardwareProfile
from qwenrun.units import GIB, MIB

CUDA_CONTEXT_BYTES = 512 * MIB
GPU_MARGIN_BYTES = 1 * GIB
OS_RESERVE_MIN_BYTES = 2 * GIB
OS_RESERVE_FRACTION = 0.10

Kind = Literal["gpu", "cpu", "remote"]


def os_reserve(ram_total: int) -> int:
    """RAM left to the OS and other programs on top of what they use now."""
    return max(OS_RESERVE_MIN_BYTES, int(ram_total * OS_RESERVE_FRACTION))


@dataclass(frozen=True)
class Target:
    """One device a plan may fill."""

    name: str  # in words: "NVIDIA RTX 4090", "RAM of 10.0.0.2:50052"
    kind: Kind  # "gpu" (this machine's), "cpu" (this machine's RAM), "remote" (a worker's)
    buffer: str  # llama.cpp's name for it: "CUDA0", "CPU", "RPC1[10.0.0.2:50052]"
    machine: str  # "" for this machine, else the worker's endpoint
    is_ram: bool  # a machine's RAM (computed by its CPU), not a GPU
    capacity: int  # free memory (RAM: available now)
    reserved: int  # what is left to the driver, llama.cpp's margin, or the OS
    bandwidth_gbs: float  # of its memory, nominal, GB/s
    round_trip_s: float = 0.0  # a worker's: one request and its answer on the wire

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserved)

    @property
    def remote(self) -> bool:
        return self.machine != ""

    @property
    def where(self) -> str:
        """Its machine in words: "this machine" or "worker 10.0.0.2:50052"."""
        return machine_label(self.machine)


def machine_label(machine: str) -> str:
    """ "this machine", "worker 10.0.0.2:50052", or a hypothetical "worker 2" as it is."""
    if not machine:
        return "this machine"
    return machine if machine.startswith("worker ") else f"worker {machine}"


def _gpu_reserve() -> int:
    return CUDA_CONTEXT_BYTES + GPU_MARGIN_BYTES


def targets_of(hw: HardwareProfile, ram_bandwidth_gbs: float) -> tuple[Target, ...]:
    """Every device of `hw` and its workers (see the module docstring)."""
    out: list[Target] = []
    for i, g in enumerate(hw.gpus if hw.has_gpu else ()):
        out.append(
            Target(
                name=g.name,
                kind="gpu",
                buffer=f"CUDA{i}",
                machine="",
                is_ram=False,
                capacity=g.free_bytes or max(0, g.total_bytes - g.used_bytes),
                reserved=_gpu_reserve(),
                bandwidth_gbs=g.mem_bandwidth_gbs or 0.0,
            )
        )
    available = hw.ram_available_bytes or hw.ram_total_bytes
    out.append(
        Target(
            name="RAM",
            kind="cpu",
            buffer="CPU",
            machine="",
            is_ram=True,
            capacity=min(hw.ram_total_bytes, available),
            reserved=os_reserve(hw.ram_total_bytes),
            bandwidth_gbs=ram_bandwidth_gbs,
        )
    )
    for w in hw.workers:
        for d in w.devices:
            out.append(
                Target(
                    name=f"RAM of {w.endpoint}" if d.is_cpu else f"{d.description} of {w.endpoint}",
                    kind="remote",
                    buffer=d.buffer,
                    machine=w.endpoint,
                    is_ram=d.is_cpu,
                    capacity=d.free_bytes,
                    reserved=os_reserve(d.total_bytes) if d.is_cpu else _gpu_reserve(),
                    bandwidth_gbs=d.bandwidth_gbs,
                    round_trip_s=w.round_trip_s,
                )
            )
    return tuple(out)
