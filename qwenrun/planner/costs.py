"""The planner's model of llama.cpp's memory: bytes per device for one layout.

Contract: pure arithmetic over `ModelFacts`, no third-party imports and no I/O. The layout
values the planner searches over are defined here (`Layout`; `Spread` and its `Stage`s for
several devices). `usage(facts, layout, ...)` prices a layout in O(1) (suffix sums kept on the
facts), so the search can try every split cheaply; a `Spread` is priced per device
(`spread_usage`). It decides nothing: which layout to pick is `search.py`'s job (with
`spread.py` for several devices), how fast it runs `speed.py`'s (`spreadspeed.py`'s).

What llama.cpp does, as modelled here (llama-cpp-python 0.3.36's vendored llama.cpp,
src/llama-model.cpp, llama-kv-cache.cpp, llama-memory-recurrent.cpp, ggml-backend.cpp):

- Layers: `n_gpu_layers = k` puts the output layer and the last k-1 blocks on the GPU
  (`i_gpu_start = n_layer_all + 1 - k`); -1 means all. The input layer (`token_embd`, only a
  row lookup) always stays on the CPU. A model without `output.weight` (tied embeddings)
  gets a second copy of `token_embd` on the output device.
- MTP/NextN blocks (`nextn_predict_layers`, the last blocks) are skipped unless asked for.
- Routed experts listed in the placement go to the CPU; everything else of a GPU layer
  (attention or Gated DeltaNet, norms, router, shared expert) stays on the GPU.
- KV cache: one K and one V row per cell for each attention layer only (hybrids: the layers
  with `(i+1) % full_attention_interval == 0`), on that layer's device; cells = n_ctx
  rounded up to 256; row bytes from the KV type's block size.
- Recurrent state (hybrids): per recurrent layer `(d_conv-1)·(d_inner + 2·groups·d_state)`
  conv values plus `d_state·d_inner` state values, f32, one sequence; Qwen3.8-Flash-Next adds
  one row on its n-gram layer (`ModelFacts.ple_rs_bytes`), on that layer's device, and an
  indexer key row per cell beside the KV cache (`ModelFacts.kv_bytes_per_layer`).
- The n-gram table (Qwen3.8-Flash-Next): an input tensor, so in this machine's RAM whatever
  the GPU layers, when the layout keeps it there (`ngram_table="ram"`, read whole at load);
  left in the file (`"disk"`: llama.cpp's lazy read, a mapping whose pages the OS fetches
  as tokens touch them) it counts against no device.
- Compute buffer: llama.cpp reserves the graph of one n_ubatch-token batch and keeps the
  peak of live tensors. The engine keeps the logits of one token per batch
  (`loadconfig.N_OUTPUTS_MAX`), so the output phase is small (llama.cpp's default reserves
  n_vocab × n_ubatch f32 of logits, which was the peak up to ~200k cells). The peak is the
  attention phase: the f16 mask (n_ctx × n_ubatch) plus ~11 query-width activations per
  token (measured on CPU, Qwen3-30B shapes), plus the hidden states of the extra residual
  streams of a hyper-connected model; a sparse-attention (QSA) layer's lightning indexer adds
  per cell and token ~9.2 bytes of f32 scores and masks and its top-k indices (measured on
  generated Qwen3.8-Flash-Next layers, 4k-262k cells); without flash attention the
  n_ctx × n_ubatch × n_head f32 scores come at once. With a GPU, the host-memory weights of big
  batches (32+ tokens) are copied into the GPU's compute buffer one split at a time (ggml's
  op offload), so the GPU buffer also holds the largest CPU layer's weights; the host side
  holds the graph inputs (mask, embeddings). The figure used is that peak + 1 % + 4 MiB.
- Output buffer: one row of logits (n_vocab f32) in host memory.
- CPU repacking: on a CPU-only run, a CPU with AMX (ggml-cpu/amx: `amx_tile`, `amx_int8`)
  copies the 2-D matmul weights of Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS/F16 with rows a
  multiple of 32 (the output layer's too) into its AMX buffer, which comes first; of the
  rest, Q4_0/Q4_K/IQ4_NL/MXFP4 (AVX2) and Q2_K (AVX-512) matmul weights, routed experts
  included, are copied into a CPU_REPACK buffer. With mmap the file pages stay mapped too
  (llama.cpp reports both), but they are clean page cache the kernel can drop, so they are
  not counted against RAM. With a GPU, CPU weights live in pinned host memory (CUDA_Host)
  instead, which comes first in llama.cpp's CPU buffer list, and nothing is repacked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from qwenrun.engine.loadconfig import N_OUTPUTS_MAX
from qwenrun.planner.facts import ModelFacts, pad_ctx, range_sum
from qwenrun.planner.targets import Target
from qwenrun.units import MIB

OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda offloads host-weight ops for batches of 32+ tokens

# ggml-cpu/repack.cpp: weight types repacked for matmuls, by the ISA flag they need.
REPACK_TYPES: dict[str, str] = {
    "Q4_0": "avx2",
    "Q4_K": "avx2",
    "IQ4_NL": "avx2",
    "MXFP4": "avx2",
    "Q2_K": "avx512f",
}
# ggml-cpu/amx: the types its buffer takes (MUL_MAT only, not the experts' MUL_MAT_ID), and
# the row width each needs a multiple of; rows must be a multiple of 2 × TILE_N = 32.
AMX_TYPES: dict[str, int] = {
    "Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
    "F16": 16,
}  # fmt: skip
AMX_FLAG = "amx_int8"

COMPUTE_SLACK_FRACTION = 0.01
COMPUTE_SLACK_BYTES = 4 * MIB
# The lightning indexer's f32 scores, masks and sort per KV cell and batch token, beyond the
# f16 mask: measured 9.06-9.17 on generated qwen4exp layers at 32k-262k cells (up to 10.8 at
# 4k, where the top-k indices below are a larger share).
QSA_BYTES_PER_CELL = 9.2

NgramPlace = Literal["ram", "disk"]


# --------------------------------------------------------------------------------------
# A layout and what it costs


CpuMoeFrom = Literal["first", "last"]


@dataclass(frozen=True)
class Stage:
    """A run of consecutive trunk layers on one device (`target`, an index into the spread's
    targets), whole: attention or GDN, norms, router, shared expert, KV cache, recurrent
    state, and routed experts, except that the last `host_layers` layers of the run (and the
    single `host_tensors` of the layer before them) keep their routed experts in the RAM of
    the device's machine (`host`, a target index), computed by that machine's CPU."""

    target: int
    count: int
    host: int | None = None
    host_layers: int = 0
    host_tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spread:
    """A model over several devices, as llama.cpp lays it out: the first `cpu_layers` trunk
    layers wholly on this machine's CPU, then each stage's run in order; the output layer
    goes with the last stage. `targets` are the devices (`planner/targets.py`) the stages
    index; the byte counts of `usage` come one per target, in that order."""

    targets: tuple[Target, ...]
    cpu_layers: int
    stages: tuple[Stage, ...]
    with_output: bool = True  # False only while a search checks a run before the last

    def ranges(self) -> list[range]:
        """Each stage's trunk layers."""
        out, start = [], self.cpu_layers
        for st in self.stages:
            out.append(range(start, start + st.count))
            start += st.count
        return out

    def host_range(self, i: int) -> range:
        """The layers of stage `i` whose routed experts are all on its host."""
        r = self.ranges()[i]
        k = min(self.stages[i].host_layers, len(r))
        return range(r.stop - k, r.stop)


@dataclass(frozen=True)
class Layout:
    """Where things go, in llama.cpp's terms.

    `n_cpu_moe` whole trunk layers keep their routed experts on the CPU: the first ones
    (0..n-1, llama.cpp's `--n-cpu-moe`) or the last ones (what llama.cpp's `--fit` does),
    as `cpu_moe_from` says. The named `cpu_tensors` (routed-expert tensors of the boundary
    layer, the GPU layer next to that run: `boundary_layer`) stay on the CPU too.
    """

    n_ctx: int
    kv_type: str = "f16"
    n_gpu_layers: int = -1  # llama.cpp semantics; ignored without a GPU
    n_cpu_moe: int = 0
    cpu_tensors: tuple[str, ...] = ()
    n_ubatch: int = 512
    flash_attn: bool = True
    use_gpu: bool = True
    cpu_moe_from: CpuMoeFrom = "first"
    n_batch: int = 2048
    use_mmap: bool | None = None  # None: llama.cpp's advice (off when tensors are moved)
    spread: Spread | None = None  # several devices; the fields above that place are unused
    # Where an n-gram table (Qwen3.8-Flash-Next) lives: this machine's RAM, or the file on disk
    ngram_table: NgramPlace = "ram"

    def cpu_expert_layers(self, n_layer: int) -> range:
        """The trunk layers whose routed experts all sit on the CPU."""
        k = min(max(0, self.n_cpu_moe), n_layer)
        return range(k) if self.cpu_moe_from == "first" else range(n_layer - k, n_layer)

    def boundary_layer(self, n_layer: int) -> int:
        """The layer whose single expert tensors (`cpu_tensors`) may sit on the CPU too."""
        k = min(max(0, self.n_cpu_moe), n_layer)
        return k if self.cpu_moe_from == "first" else n_layer - k - 1


@dataclass(frozen=True)
class DeviceBytes:
    """One device's share, by what it holds (bytes)."""

    weights_dense: int = 0
    weights_experts: int = 0
    kv: int = 0
    rs: int = 0
    compute: int = 0
    output: int = 0  # the logits row llama.cpp keeps in host memory
    repack: int = 0  # mmap'd copies of repacked weights: reported, not counted in `used`
    ngram_table: int = 0  # an n-gram table read into this RAM (none when read from the file)

    @property
    def weights(self) -> int:
        return self.weights_dense + self.weights_experts

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.rs + self.compute + self.output + self.ngram_table

    @staticmethod
    def total(parts: Iterable[DeviceBytes]) -> DeviceBytes:
        """Several devices' shares together (repacked copies are one RAM's and stay out)."""
        items = list(parts)
        return DeviceBytes(
            weights_dense=sum(b.weights_dense for b in items),
            weights_experts=sum(b.weights_experts for b in items),
            kv=sum(b.kv for b in items),
            rs=sum(b.rs for b in items),
            compute=sum(b.compute for b in items),
            output=sum(b.output for b in items),
            ngram_table=sum(b.ngram_table for b in items),
        )


@dataclass(frozen=True)
class Usage:
    gpu: DeviceBytes  # a spread's: every GPU and worker together
    cpu: DeviceBytes  # this machine's RAM
    gpu_expert_layers: int  # trunk layers whose routed experts are all on the GPU
    first_gpu_layer: int  # trunk layers before this one sit wholly on the CPU
    devices: tuple[DeviceBytes, ...] = ()  # a spread's: one per target, in order


def first_gpu_layer(facts: ModelFacts, layout: Layout) -> int:
    """Index of the first block llama.cpp puts on the GPU (n_layer_all + 1 - n_gpu_layers)."""
    if not layout.use_gpu:
        return facts.n_layer_all + 1
    ngl = layout.n_gpu_layers
    k = facts.n_layer_all + 1 if ngl < 0 else min(ngl, facts.n_layer_all + 1)
    return max(0, facts.n_layer_all + 1 - k)


def _tensor_bytes(facts: ModelFacts, layer: int, names: Iterable[str]) -> int:
    wanted = set(names)
    if not 0 <= layer < facts.n_layer:
        return 0
    return sum(t.n_bytes for t in facts.expert_tensors[layer] if t.name in wanted)


def usage(facts: ModelFacts, layout: Layout, cpu_flags: frozenset[str] = frozenset()) -> Usage:
    """Bytes per device for `layout` (see the module docstring for each rule)."""
    if layout.spread is not None:
        return spread_usage(facts, layout, cpu_flags)
    s = facts.sums
    n = facts.n_layer
    first = min(first_gpu_layer(facts, layout), n)
    output_on_gpu = layout.use_gpu and first_gpu_layer(facts, layout) <= facts.n_layer_all
    cpu_moe = layout.cpu_expert_layers(n)
    boundary = layout.boundary_layer(n)  # the layer whose single tensors may stay on the CPU
    extra = _tensor_bytes(facts, boundary, layout.cpu_tensors) if boundary >= first else 0
    if not layout.use_gpu:
        first, output_on_gpu, extra = n, False, 0
    # The layers whose experts are on the GPU: from the first GPU layer, minus the CPU run.
    if layout.cpu_moe_from == "first":
        gpu_from, gpu_to = max(first, cpu_moe.stop), n
    else:
        gpu_from, gpu_to = first, max(first, cpu_moe.start)

    gpu_dense = s.dense_suffix[first] + (facts.output_bytes if output_on_gpu else 0)
    gpu_experts = s.expert_suffix[gpu_from] - s.expert_suffix[gpu_to] - extra
    cpu_dense = facts.total_dense_bytes - s.dense_suffix[first] + facts.token_embd_bytes
    if not output_on_gpu:
        # a tied output shares token_embd's data on the CPU: no second copy there
        cpu_dense += facts.output_bytes - (facts.token_embd_bytes if facts.output_tied else 0)
    cpu_experts = facts.total_expert_bytes - gpu_experts

    kv_layer = facts.kv_bytes_per_layer(layout.n_ctx, layout.kv_type)
    gpu_attn = s.attn_suffix[first]
    cpu_attn = len(facts.attn_layers) - gpu_attn

    # Weights in host memory that big batches copy to the GPU, one layer's worth at a time.
    host_copy = 0
    if layout.use_gpu and layout.n_ubatch >= OP_OFFLOAD_MIN_BATCH:
        run_max = (
            s.expert_max_prefix[cpu_moe.stop]
            if layout.cpu_moe_from == "first"
            else s.expert_max_suffix[cpu_moe.start]
        )
        host_copy = max(s.layer_max_prefix[first], run_max, extra)
    gpu_compute, cpu_compute = compute_bytes(facts, layout, output_on_gpu, host_copy)
    repack = 0 if layout.use_gpu else repack_bytes(facts, cpu_flags, with_output=True)

    gpu_rs = facts.rs_bytes_of(range(first, n))
    gpu = DeviceBytes(
        weights_dense=gpu_dense,
        weights_experts=gpu_experts,
        kv=gpu_attn * kv_layer,
        rs=gpu_rs,
        compute=gpu_compute,
    )
    cpu = DeviceBytes(
        weights_dense=cpu_dense,
        weights_experts=cpu_experts,
        kv=cpu_attn * kv_layer,
        rs=facts.rs_bytes - gpu_rs,
        compute=cpu_compute,
        output=facts.n_vocab * 4,
        repack=repack,
        ngram_table=table_in_ram(facts, layout),
    )
    on_gpu = gpu_to - gpu_from - (1 if extra else 0)
    return Usage(gpu=gpu, cpu=cpu, gpu_expert_layers=max(0, on_gpu), first_gpu_layer=first)


def table_in_ram(facts: ModelFacts, layout: Layout) -> int:
    """The n-gram table's bytes in this machine's RAM under `layout` (0: none, or on disk)."""
    return facts.table_bytes if layout.ngram_table == "ram" else 0


def _with_slack(n: int) -> int:
    return int(n * (1 + COMPUTE_SLACK_FRACTION)) + COMPUTE_SLACK_BYTES if n else 0


def compute_bytes(
    facts: ModelFacts, layout: Layout, output_on_gpu: bool, host_copy: int
) -> tuple[int, int]:
    """(GPU, CPU) compute buffers: the peak phase of one n_ubatch-token graph, plus slack."""
    ub = max(1, layout.n_ubatch)
    cells = pad_ctx(layout.n_ctx)
    hidden = 2 * facts.n_embd * ub * 4
    logits = facts.n_vocab * min(ub, N_OUTPUTS_MAX) * 4 + hidden
    # Attention phase, measured on CPU (Qwen3-30B shapes, 196k-320k cells): the f16 mask
    # (cells × n_ubatch) plus about 11 f32 activations of the query width per token, and
    # the other residual streams of a hyper-connected model.
    q_width = facts.n_head * facts.head_dim_k
    attn = cells * ub * 2 + 11 * q_width * ub * 4 + max(0, facts.hc - 1) * facts.n_embd * ub * 4
    if facts.qsa_width:
        top_k = min(cells, facts.qsa_width) * 4  # the int32 indices of the kept cells
        attn += int(ub * (QSA_BYTES_PER_CELL * cells + top_k))
    if not layout.flash_attn:
        # the materialized f32 scores, and the mask in f32
        attn += cells * ub * facts.n_head * 4 + cells * ub * 2
    moe = moe_compute_bytes(facts, layout)
    ssm = ub * facts.ssm_conv_dim * 4 * 2 + hidden if facts.is_hybrid else 0
    if not layout.use_gpu:
        return 0, _with_slack(max(logits, attn, moe, ssm))
    gpu_peak = max(attn, moe + host_copy, ssm, logits if output_on_gpu else 0)
    # Host side: graph inputs (mask, token ids, positions) and the embedding lookup; the
    # logits too when the output layer stays on the CPU.
    mask_f32 = cells * ub * 4  # the host builds the mask; counted in f32 to be safe
    cpu_peak = max(mask_f32 + hidden, logits if not output_on_gpu else 0)
    return _with_slack(gpu_peak), _with_slack(cpu_peak)


def moe_compute_bytes(facts: ModelFacts, layout: Layout) -> int:
    """The live tensors of one layer's routed experts for an n_ubatch-token batch."""
    ub = max(1, layout.n_ubatch)
    hidden = 2 * facts.n_embd * ub * 4
    moe = ub * facts.n_expert_used * (3 * facts.expert_ff + facts.n_embd) * 4
    return moe + ub * facts.n_expert * 4 + hidden


def repack_bytes(
    facts: ModelFacts,
    cpu_flags: frozenset[str],
    layers: range | None = None,
    *,
    with_output: bool = False,
) -> int:
    """Bytes of CPU matmul weights llama.cpp copies into its AMX or CPU_REPACK buffer on a
    CPU-only run of this machine (of `layers` only, when given; the output layer's too,
    `with_output`)."""
    chosen = facts.layer_types if layers is None else facts.layer_types[layers.start : layers.stop]
    tensors = [t for layer in chosen for t in layer]
    if with_output:
        tensors += facts.output_types
    amx = AMX_FLAG in cpu_flags
    total = 0
    for ggml_type, n_bytes, rows, expert, width in tensors:
        align = AMX_TYPES.get(ggml_type)
        if amx and not expert and align and rows % 32 == 0 and width % align == 0:
            total += n_bytes
            continue
        flag = REPACK_TYPES.get(ggml_type)
        if flag is not None and flag in cpu_flags and rows % 8 == 0:
            total += n_bytes
    return total


# --------------------------------------------------------------------------------------
# Several devices


def spread_usage(
    facts: ModelFacts, layout: Layout, cpu_flags: frozenset[str] = frozenset()
) -> Usage:
    """Bytes per target for a model spread over several devices (`Spread`).

    Each stage's device holds its run's dense weights, KV cache and recurrent state, the
    routed experts not kept on the host, and a compute buffer for its part of the graph
    (with the logits where the output layer is, the last stage). A host holds the experts
    its stages keep there. This machine's RAM also holds the first `cpu_layers` layers, the
    token embeddings and the logits row (and an n-gram table kept in RAM: it never leaves this
    machine); its weights are repacked only when no GPU of this machine takes layers (as on a
    CPU-only run).
    """
    spread = layout.spread
    assert spread is not None
    s = facts.sums
    n = facts.n_layer
    targets = spread.targets
    acc = [dict.fromkeys(("dense", "experts", "kv", "rs", "compute"), 0) for _ in targets]
    kv_layer = facts.kv_bytes_per_layer(layout.n_ctx, layout.kv_type)
    attn = set(facts.attn_layers)

    def put(t: int, r: range) -> None:
        """Layers `r` wholly on target `t` (their experts too)."""
        acc[t]["dense"] += range_sum(s.dense_suffix, r)
        acc[t]["experts"] += range_sum(s.expert_suffix, r)
        acc[t]["kv"] += sum(1 for i in r if i in attn) * kv_layer
        acc[t]["rs"] += facts.rs_bytes_of(r)

    ram = next(i for i, t in enumerate(targets) if t.kind == "cpu")
    cpu_run = range(0, min(spread.cpu_layers, n))
    put(ram, cpu_run)
    ranges = spread.ranges()
    last = len(spread.stages) - 1
    local_gpu_layers = False
    for i, (st, r) in enumerate(zip(spread.stages, ranges, strict=True)):
        r = range(min(r.start, n), min(r.stop, n))
        put(st.target, r)
        target = targets[st.target]
        local_gpu_layers |= target.kind == "gpu" and len(r) > 0
        moved = 0
        host_run = spread.host_range(i)
        if st.host is not None and len(host_run):
            moved = range_sum(s.expert_suffix, host_run)
        boundary = host_run.start - 1
        if st.host is not None and st.host_tensors and boundary in r:
            moved += _tensor_bytes(facts, boundary, st.host_tensors)
        if st.host is not None and moved:
            acc[st.target]["experts"] -= moved
            acc[st.host]["experts"] += moved
            if targets[st.host].remote:
                # A worker's CPU computes its experts in its own graph split.
                acc[st.host]["compute"] += _with_slack(moe_compute_bytes(facts, layout))
        # Big batches copy host-held experts of a local GPU's layers into its compute buffer.
        host_copy = 0
        if target.kind == "gpu" and st.host is not None and layout.n_ubatch >= OP_OFFLOAD_MIN_BATCH:
            host_copy = max((facts.expert_bytes[j] for j in host_run), default=0)
        has_output = i == last and spread.with_output
        compute, _ = compute_bytes(facts, layout, has_output, host_copy)
        acc[st.target]["compute"] += compute
        if has_output:
            acc[st.target]["dense"] += facts.output_bytes
    # This machine's RAM: the embeddings, the host side of the graph, the logits row.
    acc[ram]["dense"] += facts.token_embd_bytes
    on_gpu = bool(spread.stages)
    _, host_compute = compute_bytes(facts, replace(layout, use_gpu=on_gpu), on_gpu, 0)
    acc[ram]["compute"] += host_compute
    repack = 0 if local_gpu_layers else repack_bytes(facts, cpu_flags, cpu_run)
    out = []
    for i, a in enumerate(acc):
        out.append(
            DeviceBytes(
                weights_dense=a["dense"],
                weights_experts=a["experts"],
                kv=a["kv"],
                rs=a["rs"],
                compute=a["compute"],
                output=facts.n_vocab * 4 if i == ram else 0,
                repack=repack if i == ram else 0,
                ngram_table=table_in_ram(facts, layout) if i == ram else 0,
            )
        )
    gpu = DeviceBytes.total(b for i, b in enumerate(out) if i != ram)
    on_devices = sum(
        len(r) - min(st.host_layers, len(r))
        for st, r in zip(spread.stages, ranges, strict=True)
        if not targets[st.target].is_ram
    )
    return Usage(
        gpu=gpu,
        cpu=out[ram],
        gpu_expert_layers=on_devices,
        first_gpu_layer=spread.cpu_layers,
        devices=tuple(out),
    )
