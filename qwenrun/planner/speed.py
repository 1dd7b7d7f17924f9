"""The planner's model of llama.cpp's speed: decode and prefill tokens per second.

Contract: pure arithmetic over `ModelFacts`, a `Layout` and its `Usage` (bytes per device),
plus the machine's bandwidths. Decode is memory-bound: the bytes each token reads from VRAM
and from RAM (dense weights whole, routed experts by the active fraction) over each device's
effective bandwidth, plus fixed per-token and per-hop costs. Prefill is a rough compute
model (FLOPs over a rate, plus the host-held experts copied over PCIe once per micro-batch).
It decides nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from qwenrun import hwprobe
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.costs import Layout, Usage
from qwenrun.planner.facts import ModelFacts

GPU_BANDWIDTH_EFFICIENCY = 0.6  # llama.cpp's quantized mat-vec reaches ~60 % of peak
CPU_BANDWIDTH_EFFICIENCY = 0.85  # of an achievable (measured copy) figure
TOKEN_OVERHEAD_S = 0.001  # sampling, graph launch, synchronisation per token
HOP_OVERHEAD_S = 0.0001  # per layer whose experts run on the CPU while the rest is on GPU
PCIE_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Speed:
    decode_tok_s: float
    prefill_tok_s: float
    gpu_bytes_per_token: int
    cpu_bytes_per_token: int


def pcie_gbs(pcie: str | None) -> float:
    """Usable host→GPU bandwidth in GB/s from a link such as "4.0 x16" (default 4.0 x16)."""
    per_lane = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
    gen, width = 4, 16
    if pcie:
        head, _, tail = pcie.partition(" x")
        with contextlib.suppress(ValueError):
            gen, width = int(float(head)), int(tail)
    return per_lane.get(gen, 1.969) * width * PCIE_EFFICIENCY


def gpu_flops(compute_capability: tuple[int, int] | None) -> float:
    """Rough sustained FLOP/s of llama.cpp's quantized matmuls by GPU generation."""
    table = {7: 20e12, 8: 40e12, 9: 150e12, 10: 150e12, 12: 80e12}
    if compute_capability is None:
        return 30e12
    major, minor = compute_capability
    if major == 8 and minor == 0:
        return 100e12  # A100
    return table.get(major, 30e12)


def cpu_flops(cores: int, flags: frozenset[str]) -> float:
    """Rough sustained FLOP/s of llama.cpp's CPU matmuls: cores × 3 GHz × SIMD width × ½."""
    width = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
    return max(1, cores) * 3e9 * width * 0.5


def speed(
    facts: ModelFacts,
    layout: Layout,
    use: Usage,
    *,
    gpu_bandwidth_gbs: float | None,
    cpu_bandwidth_gbs: float,
    gpu_cc: tuple[int, int] | None,
    pcie: str | None,
    cores: int,
    cpu_flags: frozenset[str],
) -> Speed:
    """Predicted decode tok/s (bandwidth model) and prefill tok/s (rough compute model)."""
    frac = facts.active_fraction
    # token_embd is a row lookup: one row per token, negligible
    gpu_read = use.gpu.weights_dense + int(use.gpu.weights_experts * frac)
    cpu_read = use.cpu.weights_dense - facts.token_embd_bytes + int(use.cpu.weights_experts * frac)
    cpu_read = max(0, cpu_read)
    t = TOKEN_OVERHEAD_S + cpu_read / (cpu_bandwidth_gbs * 1e9 * CPU_BANDWIDTH_EFFICIENCY)
    if layout.use_gpu and gpu_bandwidth_gbs:
        t += gpu_read / (gpu_bandwidth_gbs * 1e9 * GPU_BANDWIDTH_EFFICIENCY)
        cpu_layers = facts.n_layer - use.gpu_expert_layers if facts.is_moe else 0
        t += HOP_OVERHEAD_S * cpu_layers
    decode = 1.0 / t

    flops_per_token = 2 * (facts.dense_params + facts.expert_params * frac)
    ub = max(1, layout.n_ubatch)
    if layout.use_gpu:
        host_weights = use.cpu.weights - facts.token_embd_bytes
        t_batch = ub * flops_per_token / gpu_flops(gpu_cc) + max(0, host_weights) / (
            pcie_gbs(pcie) * 1e9
        )
    else:
        t_batch = ub * flops_per_token / cpu_flops(cores, cpu_flags)
    prefill = ub / t_batch if t_batch > 0 else 0.0
    return Speed(decode, prefill, gpu_read if layout.use_gpu else 0, cpu_read)


# --------------------------------------------------------------------------------------
# This machine's numbers


def gpu_bandwidth(hw: HardwareProfile) -> float:
    """The GPUs' memory bandwidth in GB/s (their mean), or a hypothetical card's."""
    known = [g.mem_bandwidth_gbs for g in hw.gpus if g.mem_bandwidth_gbs]
    if not known:
        return hwprobe.HYPOTHETICAL_GPU_BANDWIDTH_GBS
    return sum(known) / len(known)


def cpu_bandwidth(hw: HardwareProfile) -> tuple[float, str]:
    """RAM bandwidth in GB/s, and where the figure comes from (in words)."""
    if hw.cpu_bandwidth_gbs:
        gbs = hw.cpu_bandwidth_gbs
        source = hw.cpu_bandwidth_source
    else:
        gbs, source = hwprobe.default_cpu_bandwidth(hw.cpu_model, hw.physical_cores)
    if source == "measured":
        return gbs, "measured"
    return gbs, "a conservative default; `qwenrun probe --measure` measures it"


def predict(
    facts: ModelFacts, layout: Layout, use: Usage, hw: HardwareProfile, has_gpu: bool
) -> Speed:
    """`speed()` with this machine's bandwidths, GPU generation, PCIe link and cores."""
    gpu0 = hw.gpus[0] if has_gpu and hw.gpus else None
    return speed(
        facts,
        layout,
        use,
        gpu_bandwidth_gbs=gpu_bandwidth(hw),
        cpu_bandwidth_gbs=cpu_bandwidth(hw)[0],
        gpu_cc=gpu0.compute_capability if gpu0 else None,
        pcie=gpu0.pcie if gpu0 else None,
        cores=hw.physical_cores,
        cpu_flags=hw.cpu_flags,
    )
