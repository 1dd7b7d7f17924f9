"""The planner's model of llama.cpp's speed: decode and prefill tokens per second.

Contract: pure arithmetic, no I/O. A placement is described as a `Work` value (per trunk
block: bytes, where they sit, KV and attention size; `work_of(facts, layout)` builds it from
`ModelFacts` and a `Layout`), the machine as a `Machine` value (`machine_of(hw)`: nominal
figures from `hwprobe`, no efficiency applied); `predict_decode` / `predict_prefill` return
tokens per second under `SpeedParams`, and `predict(facts, layout, use, hw)` gives the
plan's `Speed`. The parameters are calibrated on measurements of a real GPU (the H200 runs of
2026-11-27 in benchmarks/gpu/); a machine's own `qwenrun bench` runs re-fit them with `fit`
(robust least squares in log space with log-normal priors, so a few noisy runs cannot push
a parameter they do not constrain to a silly value), and `hw.speed_params` carries the
result (put there by the start-up, `machine.py`, from `bench.store`). It decides nothing.

Decode, per token, with a GPU (llama.cpp CUDA build; routed experts of some blocks overridden
to host memory, or the first blocks wholly on the CPU with a smaller n_gpu_layers):

    t = token_overhead                              sampling, logits copy, graph build, Python
      + gpu_blocks · gpu_layer_overhead             kernel launches and syncs per GPU block
      + gpu_bytes / (gpu_efficiency · GPU peak)     dense weights, 8/128 of the experts, KV
      + cpu_bytes / (cpu_efficiency · RAM bw)       active experts in RAM; whole CPU blocks
      + expert_hops · hop_overhead                  one GPU→CPU→GPU round trip per GPU block
                                                    whose experts (some or all) are in RAM
      + cpu_blocks · cpu_layer_overhead             per block run wholly on the CPU

`gpu_time_scale` / `cpu_time_scale` (1.0 on the H200) multiply the GPU-side and CPU-side terms:
they are what `fit` moves first on a new machine. `RAM bw` is the machine's achievable copy
bandwidth (`probe --measure`, or hwprobe's default) capped at threads × `per_thread_gbs`.
Which blocks hold CPU experts (first N or last N) does not enter: a token reads 8 experts per
block wherever they are, and on the H200 data both orders decode at the same speed within the
noise. Without a GPU: token_overhead + all bytes /
(cpu_only_efficiency · RAM bw) + blocks · cpu_only_layer_overhead. An n-gram table read from
the file (Qwen3.8-Flash-Next) adds `table_disk_token_s` per decoded token and
`table_disk_prompt_token_s` per prompt token (`with_table_reads`; a rough figure).

Prefill, per micro-batch of b tokens (n_ubatch at most), with a GPU:

    b ≥ 32 (ggml's op offload): host-held weights are copied to the GPU for each matmul; of a
    routed-expert tensor only the experts the batch uses (ggml_backend_sched_compute_splits):
    t_ub = ubatch_overhead
         + (b · flops_per_token + GPU attention flops) / (gpu_flops_efficiency · GPU flops)
         + (coverage(b) · host expert bytes + host dense bytes) / (pcie_efficiency · PCIe)
         + expert_hops · prefill_hop_overhead       ids read back + sync per CPU-expert block
         + CPU attention flops / (cpu_attn_gflops_per_thread · threads)
                                                    attention of a CPU block stays on the CPU
                                                    (its KV cache lives there)
         + cpu_blocks · cpu_layer_overhead
    coverage(b) = 1 − (1 − k/E)^b for uniform routing (≈ 1 for b = 512 and 8 of 128 experts);
    `prefill_expert_coverage` replaces it when measured.
    b < 32: host-held experts are computed on the CPU: one decode step plus b − 1 tokens of
    GPU compute and the extra experts the batch touches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

from qwenrun import hwprobe
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.costs import Layout, Usage, first_gpu_layer
from qwenrun.planner.facts import CTX_PAD, ModelFacts

GB = 1e9
KV_PAD = 256  # llama.cpp pads the KV cells it reads (n_kv) to a multiple of 256
OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda offloads host-weight matmuls for batches of 32+ tokens
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


# --------------------------------------------------------------------------------------
# What runs where


@dataclass(frozen=True)
class BlockWork:
    """One trunk block as placed. Bytes are as stored (quantized)."""

    # everything but routed experts: attention or GDN, norms, router, shared expert
    dense_bytes: int
    # all routed-expert bytes of the block, and the part of them held in host memory
    expert_bytes: int
    cpu_expert_bytes: int
    # the block's dense part, KV cache and recurrent state are on the GPU
    on_gpu: bool
    # K+V bytes per context cell and 4 · n_head · head_dim (0 for a recurrent block)
    kv_bytes_per_cell: int = 0
    attn_flops_per_cell: int = 0
    # recurrent state read and written per token (hybrids)
    state_bytes: int = 0


@dataclass(frozen=True)
class Work:
    blocks: tuple[BlockWork, ...]
    output_bytes: int  # output.weight + output_norm, read once per token
    output_on_gpu: bool
    n_expert: int
    n_expert_used: int
    flops_per_token: float  # 2 · (dense params + active expert params) of the matmuls
    use_gpu: bool = True

    @property
    def active_fraction(self) -> float:
        if self.n_expert <= 0:
            return 1.0
        return min(1.0, self.n_expert_used / self.n_expert)

    def _on_gpu(self, b: BlockWork) -> bool:
        return self.use_gpu and b.on_gpu

    @property
    def expert_hops(self) -> int:
        """GPU blocks whose experts (some or all) run on the CPU: one round trip each."""
        return sum(1 for b in self.blocks if self._on_gpu(b) and b.cpu_expert_bytes > 0)

    @property
    def cpu_blocks(self) -> int:
        return sum(1 for b in self.blocks if not self._on_gpu(b))

    @property
    def gpu_blocks(self) -> int:
        return len(self.blocks) - self.cpu_blocks

    @property
    def host_expert_bytes(self) -> int:
        return sum(b.cpu_expert_bytes if self._on_gpu(b) else b.expert_bytes for b in self.blocks)

    @property
    def host_dense_bytes(self) -> int:
        dense = sum(b.dense_bytes for b in self.blocks if not self._on_gpu(b))
        return dense + (0 if self.output_on_gpu and self.use_gpu else self.output_bytes)


def n_kv(context_tokens: int) -> int:
    """KV cells llama.cpp reads for a token at this context length (padded to 256)."""
    return max(KV_PAD, -(-max(1, context_tokens) // KV_PAD) * KV_PAD)


def decode_bytes(work: Work, context_tokens: int) -> tuple[float, float]:
    """(VRAM, RAM) bytes read per decoded token at `context_tokens` of context."""
    frac = work.active_fraction
    cells = n_kv(context_tokens)
    gpu = cpu = 0.0
    for b in work.blocks:
        per_block = b.dense_bytes + b.kv_bytes_per_cell * cells + b.state_bytes
        if work.use_gpu and b.on_gpu:
            gpu += per_block + (b.expert_bytes - b.cpu_expert_bytes) * frac
            cpu += b.cpu_expert_bytes * frac
        else:
            cpu += per_block + b.expert_bytes * frac
    if work.use_gpu and work.output_on_gpu:
        gpu += work.output_bytes
    else:
        cpu += work.output_bytes
    return gpu, cpu


# --------------------------------------------------------------------------------------
# The machine and the parameters


def pcie_nominal_gbs(link: str | None) -> float:
    """Nominal host→GPU GB/s of a link such as "5.0 x16" (default 4.0 x16), no efficiency."""
    gen, width = 4, 16
    if link:
        head, _, tail = link.partition(" x")
        with contextlib.suppress(ValueError):
            gen, width = int(float(head)), int(tail)
    return PCIE_LANE_GBS.get(gen, PCIE_LANE_GBS[4]) * width


@dataclass(frozen=True)
class Machine:
    """Nominal figures, as hwprobe knows them (no efficiency applied)."""

    # card peak (NVML clocks or hwprobe.GPU_BANDWIDTH_GBS); None: no usable GPU
    gpu_bandwidth_gbs: float | None
    # achievable RAM copy bandwidth: `probe --measure`, or hwprobe.default_cpu_bandwidth
    cpu_bandwidth_gbs: float
    # llama.cpp threads (qwenrun: physical cores)
    threads: int
    # nominal host→GPU link (pcie_nominal_gbs; gen5 x16: 63 GB/s)
    pcie_gbs: float = 31.5
    # gpu_flops(cc) / 1e12 (H100/H200: 150); None: no GPU
    gpu_tflops: float | None = None
    # cpu_flops(cores, flags) / 1e9: CPU-only prefill
    cpu_gflops: float = 0.0


@dataclass(frozen=True)
class SpeedParams:
    """Calibration. "H200": fitted to the 2026-11-27 H200 runs; "guess": a prior, unmeasured."""

    # --- decode with a GPU ---
    # guess (prior; the H200 data agree but cannot separate it from gpu_layer_overhead_s)
    gpu_efficiency: float = 0.6
    # H200 (with priors): share of the RAM copy bandwidth that the CPU experts' mat-vecs reach
    # (weights in CUDA_Host are not repacked; the GPU driver thread competes for a core)
    cpu_efficiency: float = 0.53
    # guess: one thread's RAM bandwidth (hwprobe.PER_CORE_BANDWIDTH_GBS)
    per_thread_gbs: float = 12.0
    # guess (prior): sampling (0.12-0.26 ms measured), logits copy, Python loop
    token_overhead_s: float = 0.0006
    # H200: with token_overhead_s, the full-GPU decode of 3.84 ms/token over 48 blocks
    gpu_layer_overhead_s: float = 53e-6
    # H200 (with priors): per GPU→CPU→GPU expert round trip; the sum with cpu_efficiency
    # (0.61 ms per CPU-expert block of the 30B) is what the data pin down
    hop_overhead_s: float = 105e-6
    # H200 (with priors): per block run wholly on the CPU (plain layer offload)
    cpu_layer_overhead_s: float = 270e-6
    # 1.0 on the H200: per-machine factors on the GPU-side and CPU-side decode terms, what a
    # fit of a few `bench` runs moves first (the terms' shape stays the H200's)
    gpu_time_scale: float = 1.0
    cpu_time_scale: float = 1.0
    # --- decode without a GPU (no data yet) ---
    cpu_only_efficiency: float = 0.7  # guess: repacked weights, no GPU driver thread
    cpu_only_layer_overhead_s: float = 50e-6  # guess: ~30 ops' barriers per block
    # --- prefill ---
    # H200: of gpu_flops (150 TFLOP/s for cc 9.x), one 512-token batch after load
    gpu_flops_efficiency: float = 0.2
    # guess: of the nominal link, from pinned host memory
    pcie_efficiency: float = 0.8
    # None: uniform routing (real text); H200_SYNTHETIC_COVERAGE on the synthetic model
    prefill_expert_coverage: float | None = None
    # guess (prior): ids read-back + sync per CPU-expert block and micro-batch
    prefill_hop_overhead_s: float = 50e-6
    # guess: not separable from GPU compute with one prompt size
    ubatch_overhead_s: float = 0.0
    # H200: CPU flash attention of CPU blocks (f16 KV), per thread (16 threads)
    cpu_attn_gflops_per_thread: float = 10.4
    # guess: CPU-only prefill (cpu_flops is already a rough figure)
    cpu_flops_efficiency: float = 1.0
    # --- several machines (llama.cpp's RPC backend) ---
    # loopback, 2026-12-06 (benchmarks/rpc_handoff.py): each graph split on a worker costs
    # about this beyond the wire's round trip (commands, copies, the worker's graph)
    rpc_split_overhead_s: float = 150e-6
    # guess: what a local network carries, GB/s (10 GbE); the logits of a last run on a
    # worker cross it each token
    network_gbs: float = 1.1
    # --- an n-gram table read from the file (Qwen3.8-Flash-Next, llama.cpp's lazy read) ---
    # Rough, from one report (qwen38.md §5, a Strix Halo): 33 tok/s decode with the table in
    # RAM, 11 tok/s read from the disk, so 1/11 - 1/33 s more per token (its 16 random rows,
    # page faults on an SSD, waited for one after another); prefill 181 tok/s lazy (pp512,
    # llama.cpp PR #29030) against ~340 resident: 1/181 - 1/340 s more per prompt token
    # (a batch's rows are prefetched together). Both depend on the disk above all.
    table_disk_token_s: float = 1 / 11 - 1 / 33
    table_disk_prompt_token_s: float = 1 / 181 - 1 / 340


DEFAULT = SpeedParams()
# Expert coverage fitted on the synthetic (random-weight) 30B with a repetitive prompt: a
# 512-token micro-batch touched ~38 % of each CPU block's experts. Real text routes a 512-token
# batch to nearly all of them, which is what `None` (uniform routing) gives.
H200_SYNTHETIC_COVERAGE = 0.38


# --------------------------------------------------------------------------------------
# Prediction


def _cpu_bw(efficiency: float, params: SpeedParams, machine: Machine) -> float:
    cap = max(1, machine.threads) * params.per_thread_gbs
    return efficiency * min(machine.cpu_bandwidth_gbs, cap) * GB


def _has_gpu(work: Work, machine: Machine) -> bool:
    return work.use_gpu and bool(machine.gpu_bandwidth_gbs)


def decode_seconds(
    work: Work, machine: Machine, context_tokens: int, params: SpeedParams = DEFAULT
) -> float:
    """Seconds per decoded token at `context_tokens` of context."""
    if not _has_gpu(work, machine):
        _, cpu_bytes = decode_bytes(replace(work, use_gpu=False), context_tokens)
        return (
            params.token_overhead_s
            + cpu_bytes / _cpu_bw(params.cpu_only_efficiency, params, machine)
            + len(work.blocks) * params.cpu_only_layer_overhead_s
        )
    assert machine.gpu_bandwidth_gbs
    gpu_bytes, cpu_bytes = decode_bytes(work, context_tokens)
    gpu_side = work.gpu_blocks * params.gpu_layer_overhead_s + gpu_bytes / (
        params.gpu_efficiency * machine.gpu_bandwidth_gbs * GB
    )
    cpu_side = (
        cpu_bytes / _cpu_bw(params.cpu_efficiency, params, machine)
        + work.expert_hops * params.hop_overhead_s
        + work.cpu_blocks * params.cpu_layer_overhead_s
    )
    return (
        params.token_overhead_s
        + params.gpu_time_scale * gpu_side
        + params.cpu_time_scale * cpu_side
    )


def predict_decode(
    work: Work, machine: Machine, context_tokens: int, params: SpeedParams = DEFAULT
) -> float:
    """Decode tokens per second at `context_tokens` of context (prompt + answer so far)."""
    return 1.0 / decode_seconds(work, machine, context_tokens, params)


def expert_coverage(work: Work, batch: int, params: SpeedParams = DEFAULT) -> float:
    """Share of a block's experts that a batch of `batch` tokens uses."""
    if params.prefill_expert_coverage is not None:
        return min(1.0, params.prefill_expert_coverage)
    return 1.0 - (1.0 - work.active_fraction) ** max(1, batch)


def _ubatch_seconds(work: Work, machine: Machine, start: int, b: int, params: SpeedParams) -> float:
    cells = n_kv(start + b)
    causal = 0.5  # each token attends to the cells before it
    cpu_cell_flops = sum(x.attn_flops_per_cell for x in work.blocks if not work._on_gpu(x))
    gpu_cell_flops = sum(x.attn_flops_per_cell for x in work.blocks if work._on_gpu(x))
    cpu_attn = b * cells * causal * cpu_cell_flops
    cpu_attn_s = cpu_attn / (params.cpu_attn_gflops_per_thread * max(1, machine.threads) * 1e9)
    if not (_has_gpu(work, machine) and machine.gpu_tflops):
        rate = max(1.0, machine.cpu_gflops * 1e9 * params.cpu_flops_efficiency)
        return b * work.flops_per_token / rate + cpu_attn_s
    gpu_rate = params.gpu_flops_efficiency * machine.gpu_tflops * 1e12
    gpu_flops = b * work.flops_per_token + b * cells * causal * gpu_cell_flops
    cover = expert_coverage(work, b, params)
    if b >= OP_OFFLOAD_MIN_BATCH:
        upload = cover * work.host_expert_bytes + work.host_dense_bytes
        return (
            params.ubatch_overhead_s
            + gpu_flops / gpu_rate
            + upload / (params.pcie_efficiency * machine.pcie_gbs * GB)
            + work.expert_hops * params.prefill_hop_overhead_s
            + cpu_attn_s
            + work.cpu_blocks * params.cpu_layer_overhead_s
        )
    # Small batches: one decode step, the other tokens' GPU compute, and the extra experts
    # the batch touches in RAM (each used expert is read once per batch).
    extra_experts = max(0.0, cover - work.active_fraction) * work.host_expert_bytes
    return (
        decode_seconds(work, machine, start + b, params)
        + (b - 1) * work.flops_per_token / gpu_rate
        + extra_experts / _cpu_bw(params.cpu_efficiency, params, machine)
        + cpu_attn_s
    )


def prefill_seconds(
    work: Work,
    machine: Machine,
    prompt_tokens: int,
    n_ubatch: int = 512,
    params: SpeedParams = DEFAULT,
    context_before: int = 0,
) -> float:
    """Seconds to evaluate `prompt_tokens` new tokens after `context_before` cached ones."""
    t, done = 0.0, 0
    ub = max(1, n_ubatch)
    while done < prompt_tokens:
        b = min(ub, prompt_tokens - done)
        t += _ubatch_seconds(work, machine, context_before + done, b, params)
        done += b
    return t


def predict_prefill(
    work: Work,
    machine: Machine,
    prompt_tokens: int,
    n_ubatch: int = 512,
    params: SpeedParams = DEFAULT,
    context_before: int = 0,
) -> float:
    """Prompt tokens per second."""
    if prompt_tokens <= 0:
        return 0.0
    t = prefill_seconds(work, machine, prompt_tokens, n_ubatch, params, context_before)
    return prompt_tokens / t


# --------------------------------------------------------------------------------------
# Building `Work` (the planner side)


def work_from_blocks(
    dense_bytes: Sequence[int],
    expert_bytes: Sequence[int],
    cpu_expert_bytes: Sequence[int],
    first_gpu_block: int,
    *,
    output_bytes: int,
    output_on_gpu: bool,
    n_expert: int,
    n_expert_used: int,
    flops_per_token: float,
    attn_blocks: Sequence[int],
    kv_bytes_per_cell: int,
    attn_flops_per_cell: int,
    state_bytes: int = 0,
    use_gpu: bool = True,
) -> Work:
    """`Work` from per-block sums and a layout.

    From `ModelFacts`: `dense_bytes` = ModelFacts.dense_bytes, `expert_bytes` =
    ModelFacts.expert_bytes, `attn_blocks` = ModelFacts.attn_layers, `kv_bytes_per_cell` =
    kv_bytes_per_layer(1, kv_type) (one cell after padding: divide by CTX_PAD),
    `attn_flops_per_cell` = 4 · n_head · head_dim_k, `state_bytes` = rs_bytes_per_layer,
    `flops_per_token` = 2 · (dense_params + expert_params · active_fraction). Blocks below
    `first_gpu_block` are wholly on the CPU; `cpu_expert_bytes[i]` is what of GPU block i's
    routed experts is overridden to the CPU (all of it for i < n_cpu_moe, the named tensors
    for the boundary block).
    """
    attn = set(attn_blocks)
    blocks = []
    for i, (d, e) in enumerate(zip(dense_bytes, expert_bytes, strict=True)):
        on_gpu = use_gpu and i >= first_gpu_block
        is_attn = i in attn
        blocks.append(
            BlockWork(
                dense_bytes=d,
                expert_bytes=e,
                cpu_expert_bytes=cpu_expert_bytes[i] if on_gpu else e,
                on_gpu=on_gpu,
                kv_bytes_per_cell=kv_bytes_per_cell if is_attn else 0,
                attn_flops_per_cell=attn_flops_per_cell if is_attn else 0,
                state_bytes=0 if is_attn else state_bytes,
            )
        )
    return Work(
        blocks=tuple(blocks),
        output_bytes=output_bytes,
        output_on_gpu=output_on_gpu and use_gpu,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        flops_per_token=flops_per_token,
        use_gpu=use_gpu,
    )


# --------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class Measurement:
    """One measured run: what ran, where, and what it did (None: not measured)."""

    work: Work
    machine: Machine
    context_tokens: int  # context during decode (e.g. prompt + half the answer)
    decode_tok_s: float | None
    prompt_tokens: int = 0
    prefill_tok_s: float | None = None
    n_ubatch: int = 512
    name: str = ""


@dataclass(frozen=True)
class Prior:
    """Log-normal prior on one parameter: centre, and spread as a factor (3.0: ×/÷ 3)."""

    centre: float
    spread: float


# How far each fitted parameter may move from its centre without data. `fit` centres them on
# `base` (the H200 calibration) unless given explicit priors: the two time scales are loose,
# the shape parameters tight, so a few runs of a new machine mostly rescale the CPU and GPU
# sides and many runs can also reshape them.
DECODE_SPREADS: dict[str, float] = {
    "gpu_time_scale": 2.0,
    "cpu_time_scale": 3.0,
    "token_overhead_s": 1.5,
    "gpu_efficiency": 1.2,
    "cpu_efficiency": 1.2,
    "gpu_layer_overhead_s": 1.3,
    "hop_overhead_s": 1.5,
    "cpu_layer_overhead_s": 1.5,
    # CPU-only machines (no H200 data behind these: loose)
    "cpu_only_efficiency": 2.0,
    "cpu_only_layer_overhead_s": 3.0,
}
PREFILL_SPREADS: dict[str, float] = {
    "gpu_flops_efficiency": 4.0,
    "prefill_expert_coverage": 4.0,
    "cpu_attn_gflops_per_thread": 4.0,
    "prefill_hop_overhead_s": 3.0,
    "cpu_flops_efficiency": 4.0,
}
# Generic priors (no H200 knowledge): what the H200 calibration was fitted from.
GENERIC_DECODE_PRIORS: dict[str, Prior] = {
    "gpu_efficiency": Prior(0.6, 1.5),
    "cpu_efficiency": Prior(0.6, 1.5),
    "token_overhead_s": Prior(0.0006, 2.0),
    "gpu_layer_overhead_s": Prior(50e-6, 3.0),
    "hop_overhead_s": Prior(100e-6, 3.0),
    "cpu_layer_overhead_s": Prior(150e-6, 3.0),
}
GENERIC_PREFILL_PRIORS: dict[str, Prior] = {
    "gpu_flops_efficiency": Prior(0.3, 4.0),
    "prefill_expert_coverage": Prior(0.8, 4.0),
    "cpu_attn_gflops_per_thread": Prior(20.0, 4.0),
    "prefill_hop_overhead_s": Prior(50e-6, 3.0),
}
NOISE_LOG_SIGMA = 0.15  # single 128-token runs: ±30 % seen between repeats of one placement


def priors_around(base: SpeedParams, spreads: dict[str, float]) -> dict[str, Prior]:
    out = {}
    for name, spread in spreads.items():
        value = getattr(base, name)
        out[name] = Prior(0.9 if value is None else float(value), spread)
    return out


def _soft_l1(z: float) -> float:
    return 2.0 * (math.sqrt(1.0 + z * z) - 1.0)


def _nelder_mead(
    f: Callable[[list[float]], float], x0: list[float], step: float = 0.3, iters: int = 4000
) -> list[float]:
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda k: vals[k])
        pts, vals = [pts[k] for k in order], [vals[k] for k in order]
        if vals[-1] - vals[0] < 1e-10:
            break
        centroid = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        worst = pts[-1]
        refl = [2 * centroid[j] - worst[j] for j in range(n)]
        fr = f(refl)
        if fr < vals[0]:
            expd = [3 * centroid[j] - 2 * worst[j] for j in range(n)]
            fe = f(expd)
            pts[-1], vals[-1] = (expd, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [0.5 * (centroid[j] + worst[j]) for j in range(n)]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                best = pts[0]
                pts = [best] + [[0.5 * (best[j] + p[j]) for j in range(n)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(n + 1), key=lambda k: vals[k])]


def _fit_group(
    base: SpeedParams,
    priors: dict[str, Prior],
    residuals: Callable[[SpeedParams], list[float]],
) -> SpeedParams:
    names = list(priors)

    def params_of(x: list[float]) -> SpeedParams:
        return replace(base, **{n: math.exp(v) for n, v in zip(names, x, strict=True)})

    def objective(x: list[float]) -> float:
        cost = sum(_soft_l1(r / NOISE_LOG_SIGMA) for r in residuals(params_of(x)))
        for n, v in zip(names, x, strict=True):
            prior = priors[n]
            cost += ((v - math.log(prior.centre)) / math.log(prior.spread)) ** 2
        return cost

    x = [math.log(priors[n].centre) for n in names]
    for step in (0.3, 0.1, 0.03):  # restarts: Nelder-Mead stalls on long ridges
        x = _nelder_mead(objective, x, step=step)
    return params_of(x)


def fit(
    measurements: Sequence[Measurement],
    base: SpeedParams = DEFAULT,
    decode_priors: dict[str, Prior] | None = None,
    prefill_priors: dict[str, Prior] | None = None,
) -> SpeedParams:
    """Parameters that best explain the measurements.

    Robust (soft-L1) least squares on log(predicted / measured), noise NOISE_LOG_SIGMA, plus
    log-normal priors: by default centred on `base` with DECODE_SPREADS / PREFILL_SPREADS.
    Decode and prefill are fitted separately; parameters without a prior keep `base`'s value;
    with no measurement of a kind, that kind's parameters stay at `base`.
    """
    dec = [m for m in measurements if m.decode_tok_s]
    pre = [m for m in measurements if m.prefill_tok_s and m.prompt_tokens > 0]
    params = base
    if dec:
        dpri = decode_priors if decode_priors is not None else priors_around(base, DECODE_SPREADS)

        def dres(p: SpeedParams) -> list[float]:
            return [
                math.log(predict_decode(m.work, m.machine, m.context_tokens, p) / m.decode_tok_s)
                for m in dec
                if m.decode_tok_s
            ]

        if dpri:
            params = _fit_group(params, dpri, dres)
    if pre:
        ppri = (
            prefill_priors if prefill_priors is not None else priors_around(base, PREFILL_SPREADS)
        )

        def pres(p: SpeedParams) -> list[float]:
            return [
                math.log(
                    predict_prefill(m.work, m.machine, m.prompt_tokens, m.n_ubatch, p)
                    / m.prefill_tok_s
                )
                for m in pre
                if m.prefill_tok_s
            ]

        if ppri:
            params = _fit_group(params, ppri, pres)
    return params


def describe(params: SpeedParams) -> dict[str, float | None]:
    return {f.name: getattr(params, f.name) for f in fields(params)}


# --------------------------------------------------------------------------------------
# The planner's side: a layout on a machine


# The context at which the plan's headline decode speed is predicted: a short chat. Decode
# slows as the context grows (the KV cache is read for every token); `predict_decode` takes
# any context.
PLAN_CONTEXT_TOKENS = 1024
# The prompt of the plan's headline prefill speed (llama-bench's pp512).
PLAN_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class Speed:
    decode_tok_s: float
    prefill_tok_s: float
    gpu_bytes_per_token: int
    cpu_bytes_per_token: int


def with_table_reads(sp: Speed, facts: ModelFacts, layout: Layout, hw: HardwareProfile) -> Speed:
    """`sp` with the cost of reading an n-gram table from the file, when the layout leaves it
    there (`SpeedParams.table_disk_*`, a rough figure). A table in RAM costs nothing to note:
    a token reads 16 of its rows, a few KiB."""
    if not (facts.has_table and layout.ngram_table == "disk"):
        return sp
    params = params_for(hw)
    decode = 1.0 / (1.0 / max(sp.decode_tok_s, 1e-9) + params.table_disk_token_s)
    prefill = 1.0 / (1.0 / max(sp.prefill_tok_s, 1e-9) + params.table_disk_prompt_token_s)
    return replace(sp, decode_tok_s=decode, prefill_tok_s=prefill)


def work_of(facts: ModelFacts, layout: Layout) -> Work:
    """What one token (or micro-batch) of this model reads and computes where, placed so."""
    n = facts.n_layer
    use_gpu = layout.use_gpu
    first = min(first_gpu_layer(facts, layout), n) if use_gpu else n
    run = layout.cpu_expert_layers(n)
    cpu_exp = [facts.expert_bytes[i] if i in run else 0 for i in range(n)]
    boundary = layout.boundary_layer(n)
    if layout.cpu_tensors and 0 <= boundary < n:
        wanted = set(layout.cpu_tensors)
        cpu_exp[boundary] = sum(
            t.n_bytes for t in facts.expert_tensors[boundary] if t.name in wanted
        )
    return work_from_blocks(
        facts.dense_bytes,
        facts.expert_bytes,
        cpu_exp,
        first,
        output_bytes=facts.output_bytes,
        output_on_gpu=use_gpu and first_gpu_layer(facts, layout) <= facts.n_layer_all,
        n_expert=facts.n_expert,
        n_expert_used=facts.n_expert_used,
        flops_per_token=2.0 * (facts.dense_params + facts.expert_params * facts.active_fraction),
        attn_blocks=facts.attn_layers,
        kv_bytes_per_cell=facts.kv_bytes_per_layer(CTX_PAD, layout.kv_type) // CTX_PAD,
        attn_flops_per_cell=4 * facts.n_head * facts.head_dim_k,
        state_bytes=2 * facts.rs_bytes_per_layer,  # read and written
        use_gpu=use_gpu,
    )


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


def gpu_flops(compute_capability: tuple[int, int] | None) -> float:
    """Nominal FLOP/s of llama.cpp's quantized matmuls by GPU generation (before efficiency)."""
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


def machine_of(hw: HardwareProfile, has_gpu: bool, threads: int | None = None) -> Machine:
    """This machine's nominal figures, as the model takes them."""
    gpu0 = hw.gpus[0] if has_gpu and hw.gpus else None
    n_threads = threads or hw.physical_cores or 1
    return Machine(
        gpu_bandwidth_gbs=gpu_bandwidth(hw) if gpu0 else None,
        cpu_bandwidth_gbs=cpu_bandwidth(hw)[0],
        threads=n_threads,
        pcie_gbs=pcie_nominal_gbs(gpu0.pcie if gpu0 else None),
        gpu_tflops=gpu_flops(gpu0.compute_capability) / 1e12 if gpu0 else None,
        cpu_gflops=cpu_flops(n_threads, hw.cpu_flags) / 1e9,
    )


def params_for(hw: HardwareProfile) -> SpeedParams:
    """The calibration for this machine: fitted from its bench runs when there are any."""
    return params_from(dict(hw.speed_params)) if hw.speed_params else DEFAULT


def params_from(values: Mapping[str, float]) -> SpeedParams:
    """Parameters from stored (name, value) pairs; unknown names (an older qwenrun's) are
    ignored and missing ones keep the default."""
    known = {f.name for f in fields(SpeedParams)}
    return replace(DEFAULT, **{k: float(v) for k, v in values.items() if k in known})


def predict(
    facts: ModelFacts,
    layout: Layout,
    use: Usage,
    hw: HardwareProfile,
    has_gpu: bool,
    threads: int | None = None,
) -> Speed:
    """The plan's predicted speed: decode at `PLAN_CONTEXT_TOKENS` of context, prefill of a
    `PLAN_PROMPT_TOKENS`-token prompt, on this machine with its calibration."""
    work = work_of(facts, replace(layout, use_gpu=layout.use_gpu and has_gpu))
    machine = machine_of(hw, has_gpu, threads)
    params = params_for(hw)
    decode = predict_decode(work, machine, PLAN_CONTEXT_TOKENS, params)
    prefill = predict_prefill(work, machine, PLAN_PROMPT_TOKENS, layout.n_ubatch, params)
    gpu_bytes, cpu_bytes = decode_bytes(work, PLAN_CONTEXT_TOKENS)
    on_gpu = work.use_gpu and bool(machine.gpu_bandwidth_gbs)
    return Speed(decode, prefill, int(gpu_bytes) if on_gpu else 0, int(cpu_bytes))
