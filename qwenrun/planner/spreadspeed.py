"""How fast a model spread over several devices decodes and prefills (`Spread` layouts).

Contract: pure arithmetic, no I/O, the parameters of `speed.SpeedParams` (calibrated on the
H200 data, refitted by a machine's `qwenrun bench`). One token passes the stages in order,
so their times add up (llama.cpp's layer split is a pipeline that a single sequence walks
through):

    t = token_overhead
      + Σ GPU stages   gpu_time_scale · (layers · gpu_layer_overhead
                                         + bytes read there / (gpu_efficiency · its bandwidth))
      + Σ RAM runs     cpu_time_scale · (layers · layer overhead
                                         + bytes read there / (efficiency · that RAM's bandwidth))
      + Σ hosts        cpu_time_scale · (experts read there / (cpu_efficiency · its bandwidth)
                                         + layers handing experts over · hop_overhead)
      + Σ worker splits (round trip + rpc_split_overhead)     one per run on a worker, and two
                                                              per layer whose experts sit on
                                                              another of its devices
      + logits / network bandwidth                            when the last run is a worker's

Bytes read per token are those of `speed.decode_bytes` for one block (dense part, KV cache at
the context, recurrent state, the active share of the routed experts). Prefill is rougher:
each stage computes its share of the batch's FLOPs at its device's rate, host-held experts of
this machine's GPUs cross PCIe, and each hand-off to a worker costs a round trip and the
batch's hidden states on the wire.
"""

from __future__ import annotations

from qwenrun.hwprobe import HYPOTHETICAL_GPU_BANDWIDTH_GBS, HardwareProfile
from qwenrun.planner.costs import Layout, Spread
from qwenrun.planner.facts import CTX_PAD, ModelFacts
from qwenrun.planner.speed import (
    GB,
    PLAN_CONTEXT_TOKENS,
    PLAN_PROMPT_TOKENS,
    Speed,
    SpeedParams,
    cpu_flops,
    expert_coverage,
    gpu_flops,
    n_kv,
    params_for,
    pcie_nominal_gbs,
    work_of,
)
from qwenrun.planner.targets import Target

# A worker's GPU of unknown kind: its compute, before efficiency (a mid-range card).
REMOTE_GPU_TFLOPS = 30.0


def remote_splits(spread: Spread) -> list[tuple[Target, int]]:
    """Each worker stage's graph splits per token: one for its run, and two for each layer
    whose experts sit on another of that worker's devices (there and back)."""
    out = []
    for k, st in enumerate(spread.stages):
        target = spread.targets[st.target]
        if not target.remote:
            continue
        hops = len(spread.host_range(k)) + (1 if st.host_tensors else 0)
        out.append((target, 1 + 2 * (hops if st.host is not None else 0)))
    return out


def _bandwidth(t: Target) -> float:
    return (t.bandwidth_gbs or HYPOTHETICAL_GPU_BANDWIDTH_GBS) * GB


def _block_bytes(facts: ModelFacts, i: int, cells: int, kv_cell: int, experts: bool) -> float:
    """What layer i reads per token on its device: dense part, KV, state, active experts."""
    attn = i in facts.attn_layers
    b = float(facts.dense_bytes[i] + (kv_cell * cells if attn else 2 * facts.rs_bytes_per_layer))
    if experts:
        b += facts.expert_bytes[i] * facts.active_fraction
    return b


def decode_seconds(
    facts: ModelFacts,
    layout: Layout,
    hw: HardwareProfile,
    params: SpeedParams,
    context_tokens: int,
    threads: int,
) -> float:
    """Seconds per decoded token of a spread layout (see the module docstring)."""
    spread = layout.spread
    assert spread is not None
    targets = spread.targets
    frac = facts.active_fraction
    cells = n_kv(context_tokens)
    kv_cell = facts.kv_bytes_per_layer(CTX_PAD, layout.kv_type) // CTX_PAD
    cap = max(1, threads) * params.per_thread_gbs * GB
    local_gpu = any(targets[st.target].kind == "gpu" for st in spread.stages)
    gpu_t = cpu_t = net_t = 0.0
    ram = next(t for t in targets if t.kind == "cpu")
    ram_eff = params.cpu_efficiency if local_gpu else params.cpu_only_efficiency
    ram_over = params.cpu_layer_overhead_s if local_gpu else params.cpu_only_layer_overhead_s
    for i in range(min(spread.cpu_layers, facts.n_layer)):
        cpu_t += _block_bytes(facts, i, cells, kv_cell, True) / (
            ram_eff * min(_bandwidth(ram), cap)
        )
        cpu_t += ram_over
    for k, (st, r) in enumerate(zip(spread.stages, spread.ranges(), strict=True)):
        target = targets[st.target]
        host_run = spread.host_range(k)
        hosted = set(host_run)
        for i in r:
            if i >= facts.n_layer:
                continue
            on_device = _block_bytes(facts, i, cells, kv_cell, i not in hosted)
            if target.is_ram:
                cpu_t += on_device / (params.cpu_only_efficiency * _bandwidth(target))
                cpu_t += params.cpu_only_layer_overhead_s
            else:
                gpu_t += on_device / (params.gpu_efficiency * _bandwidth(target))
                gpu_t += params.gpu_layer_overhead_s
        hops = len(host_run) + (1 if st.host_tensors else 0)
        if st.host is not None and hops:
            host = targets[st.host]
            moved = sum(facts.expert_bytes[i] for i in host_run if i < facts.n_layer)
            host_bw = _bandwidth(host) if host.remote else min(_bandwidth(host), cap)
            cpu_t += moved * frac / (params.cpu_efficiency * host_bw)
            cpu_t += hops * params.hop_overhead_s
    for target, splits in remote_splits(spread):
        net_t += splits * (target.round_trip_s + params.rpc_split_overhead_s)
    if spread.stages and targets[spread.stages[-1].target].remote:
        net_t += facts.n_vocab * 4 / (params.network_gbs * GB)
    return (
        params.token_overhead_s
        + params.gpu_time_scale * gpu_t
        + params.cpu_time_scale * cpu_t
        + net_t
    )


def prefill_seconds(
    facts: ModelFacts,
    layout: Layout,
    hw: HardwareProfile,
    params: SpeedParams,
    prompt_tokens: int,
    threads: int,
) -> float:
    """Seconds to evaluate a prompt of `prompt_tokens` with a spread layout (rough)."""
    spread = layout.spread
    assert spread is not None
    targets = spread.targets
    n = max(1, facts.n_layer)
    per_layer_flops = 2.0 * (facts.dense_params + facts.expert_params * facts.active_fraction) / n
    gpu0 = hw.gpus[0] if hw.gpus else None
    local_tflops = gpu_flops(gpu0.compute_capability if gpu0 else None) / 1e12
    pcie = pcie_nominal_gbs(gpu0.pcie if gpu0 else None) * GB * params.pcie_efficiency
    cpu_rate = max(1.0, cpu_flops(threads, hw.cpu_flags) * params.cpu_flops_efficiency)
    work = work_of(facts, Layout(n_ctx=layout.n_ctx, kv_type=layout.kv_type))
    t, done = 0.0, 0
    ub = max(1, layout.n_ubatch)
    while done < prompt_tokens:
        b = min(ub, prompt_tokens - done)
        cover = expert_coverage(work, b, params)
        t += min(spread.cpu_layers, n) * per_layer_flops * b / cpu_rate
        for k, (st, r) in enumerate(zip(spread.stages, spread.ranges(), strict=True)):
            target = targets[st.target]
            layers = max(0, min(r.stop, n) - r.start)
            flops = layers * per_layer_flops * b
            if target.is_ram:
                t += flops / cpu_rate
            else:
                tflops = local_tflops if target.kind == "gpu" else REMOTE_GPU_TFLOPS
                t += flops / (params.gpu_flops_efficiency * tflops * 1e12)
            host_run = spread.host_range(k)
            if st.host is not None and len(host_run):
                moved = sum(facts.expert_bytes[i] for i in host_run if i < n)
                if target.kind == "gpu":
                    t += cover * moved / pcie  # ggml copies them in for big batches
                t += len(host_run) * params.prefill_hop_overhead_s
            if target.remote:
                hidden = b * facts.n_embd * 4
                t += target.round_trip_s + hidden / (params.network_gbs * GB)
        done += b
    return t


def predict_spread(
    facts: ModelFacts, layout: Layout, hw: HardwareProfile, threads: int | None = None
) -> Speed:
    """The plan's speed for a spread: decode at `PLAN_CONTEXT_TOKENS` of context, prefill of
    a `PLAN_PROMPT_TOKENS`-token prompt, with this machine's calibration."""
    params = params_for(hw)
    n_threads = threads or hw.physical_cores or 1
    decode = 1.0 / decode_seconds(facts, layout, hw, params, PLAN_CONTEXT_TOKENS, n_threads)
    prefill_s = prefill_seconds(facts, layout, hw, params, PLAN_PROMPT_TOKENS, n_threads)
    prefill = PLAN_PROMPT_TOKENS / prefill_s if prefill_s > 0 else 0.0
    gpu_b, cpu_b = _bytes_per_token(facts, layout.spread, layout)
    return Speed(decode, prefill, int(gpu_b), int(cpu_b))


def _bytes_per_token(
    facts: ModelFacts, spread: Spread | None, layout: Layout
) -> tuple[float, float]:
    """(device memory, RAM) bytes read per token at the plan's context."""
    assert spread is not None
    cells = n_kv(PLAN_CONTEXT_TOKENS)
    kv_cell = facts.kv_bytes_per_layer(CTX_PAD, layout.kv_type) // CTX_PAD
    frac = facts.active_fraction
    dev = ram = 0.0
    for i in range(min(spread.cpu_layers, facts.n_layer)):
        ram += _block_bytes(facts, i, cells, kv_cell, True)
    for k, (st, r) in enumerate(zip(spread.stages, spread.ranges(), strict=True)):
        hosted = set(spread.host_range(k))
        for i in r:
            if i >= facts.n_layer:
                continue
            b = _block_bytes(facts, i, cells, kv_cell, i not in hosted)
            if spread.targets[st.target].is_ram:
                ram += b
            else:
                dev += b
            if i in hosted:
                ram += facts.expert_bytes[i] * frac
    return dev, ram
