"""The planner's model of llama.cpp: bytes per device and tokens per second for one layout.

Contract: pure arithmetic over a `GGUFInfo` value (tensor list + metadata), no third-party
imports and no I/O. `ModelFacts.from_info` condenses a GGUF (local: exact bytes; catalog
estimate: computed bytes) into per-layer sums once; `usage(facts, layout, ...)` then prices
a layout in O(1), so the planner can try every split cheaply. It decides nothing: which
layout to pick is `offload.py`'s job.

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
  conv values plus `d_state·d_inner` state values, f32, one sequence.
- Compute buffer: llama.cpp reserves the graph of one n_ubatch-token batch and keeps the
  peak of live tensors. Measured on this commit (CPU, real Qwen3-30B/Qwen3.5-35B shapes),
  the peak is the output phase (logits, n_vocab × n_ubatch f32, plus two hidden states)
  up to ~200k cells; beyond, the attention phase (the f16 mask, n_ctx × n_ubatch, plus
  ~11 query-width activations per token) takes over, and without flash attention at once
  (n_ctx × n_ubatch × n_head f32 scores). With a GPU, the host-memory weights of big
  batches (32+ tokens) are copied into the GPU's compute buffer one split at a time (ggml's
  op offload), so the GPU buffer also holds the largest CPU layer's weights; the host side
  holds the graph inputs (mask, embeddings). The figure used is that peak + 1 % + 4 MiB.
- Output buffer: one row of logits (n_vocab f32) in host memory.
- CPU repacking: on a CPU-only run, Q4_0/Q4_K/IQ4_NL/MXFP4 (AVX2) and Q2_K (AVX-512) matmul
  weights are copied into a CPU_REPACK buffer. With mmap the file pages stay mapped too
  (llama.cpp reports both), but they are clean page cache the kernel can drop, so they are
  not counted against RAM. With a GPU, CPU weights live in pinned host memory (CUDA_Host)
  instead, which comes first in llama.cpp's CPU buffer list, and nothing is repacked.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenrun.gguf_info import GGUFInfo, TensorInfo

MIB = 1 << 20
GIB = 1 << 30

HYBRID_ARCHES = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp"})
CTX_PAD = 256  # llama_context rounds n_ctx up to a multiple of 256
OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda offloads host-weight ops for batches of 32+ tokens

# (block elements, bytes per block) of the KV cache types llama.cpp accepts; the same
# numbers as gguf's GGML_QUANT_SIZES (tests/test_offload.py checks them against it).
KV_TYPE_SIZES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

# ggml-cpu/repack.cpp: weight types repacked for matmuls, by the ISA flag they need.
REPACK_TYPES: dict[str, str] = {
    "Q4_0": "avx2",
    "Q4_K": "avx2",
    "IQ4_NL": "avx2",
    "MXFP4": "avx2",
    "Q2_K": "avx512f",
}

COMPUTE_SLACK_FRACTION = 0.01
COMPUTE_SLACK_BYTES = 4 * MIB


def pad_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def kv_row_bytes(kv_type: str, n_elements: int) -> int:
    block, size = KV_TYPE_SIZES[kv_type.lower()]
    return -(-n_elements // block) * size


# --------------------------------------------------------------------------------------
# Facts about one GGUF


@dataclass(frozen=True)
class ExpertTensor:
    name: str
    n_bytes: int


@dataclass(frozen=True)
class ModelFacts:
    """Everything the memory and speed model needs, summed per layer."""

    arch: str
    name: str
    n_layer_all: int  # block_count, MTP blocks included
    n_layer: int  # trunk blocks (what runs)
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    n_vocab: int
    ctx_native: int
    attn_layers: tuple[int, ...]
    recr_layers: tuple[int, ...]
    rs_bytes_per_layer: int
    ssm_conv_dim: int
    token_embd_bytes: int
    output_bytes: int  # output.weight (or the tied copy of token_embd), output_norm, extras
    output_tied: bool
    dense_bytes: tuple[int, ...]  # per trunk layer: everything but routed experts
    expert_bytes: tuple[int, ...]  # per trunk layer: routed experts
    expert_tensors: tuple[tuple[ExpertTensor, ...], ...]  # per trunk layer
    dense_params: int  # elements read per token, for FLOPs: all but routed experts, embd
    expert_params: int  # elements of all routed experts
    skipped_bytes: int  # MTP blocks llama.cpp does not load
    has_shared_expert: bool
    file_bytes: int
    # per trunk layer, tensors as (ggml type, bytes, rows, routed expert) for repack sums
    layer_types: tuple[tuple[tuple[str, int, int, bool], ...], ...]

    @functools.cached_property
    def sums(self) -> _Sums:
        """Suffix sums over layers, computed once (cached on the frozen instance)."""
        return _sums(self)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recr_layers)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and any(self.expert_bytes)

    @property
    def total_expert_bytes(self) -> int:
        return sum(self.expert_bytes)

    @property
    def total_dense_bytes(self) -> int:
        return sum(self.dense_bytes)

    @property
    def weight_bytes(self) -> int:
        """Bytes llama.cpp loads (file tensors minus skipped MTP blocks)."""
        return (
            self.token_embd_bytes
            + self.output_bytes
            + self.total_dense_bytes
            + (self.total_expert_bytes)
        )

    @property
    def active_fraction(self) -> float:
        """Share of each routed-expert tensor one token reads."""
        if self.n_expert <= 0:
            return 1.0
        return min(1.0, self.n_expert_used / self.n_expert)

    def kv_bytes_per_layer(self, n_ctx: int, kv_type: str) -> int:
        cells = pad_ctx(n_ctx)
        k = kv_row_bytes(kv_type, self.head_dim_k * self.n_head_kv)
        v = kv_row_bytes(kv_type, self.head_dim_v * self.n_head_kv)
        return cells * (k + v)

    def kv_bytes(self, n_ctx: int, kv_type: str) -> int:
        return len(self.attn_layers) * self.kv_bytes_per_layer(n_ctx, kv_type)

    @property
    def rs_bytes(self) -> int:
        return len(self.recr_layers) * self.rs_bytes_per_layer

    @classmethod
    def from_info(cls, info: GGUFInfo, name: str | None = None) -> ModelFacts:
        return _facts(info, name)


def _meta_int(info: GGUFInfo, key: str, default: int = 0) -> int:
    value: Any = info.get(key, None)
    if isinstance(value, list | tuple):
        # per-layer arrays (head_count_kv on some models): the largest is what is allocated
        value = max((int(v) for v in value), default=default)
    if value is None:
        return default
    return int(value)


def _n_elements(t: TensorInfo) -> int:
    return math.prod(t.shape) if t.shape else 0


def _facts(info: GGUFInfo, name: str | None) -> ModelFacts:
    arch = info.arch
    n_layer_all = _meta_int(info, "block_count", info.n_layer)
    nextn = _meta_int(info, "nextn_predict_layers", 0)
    n_layer = max(0, n_layer_all - nextn)
    n_embd = _meta_int(info, "embedding_length")
    n_head = _meta_int(info, "attention.head_count", 1) or 1
    n_head_kv = _meta_int(info, "attention.head_count_kv", n_head) or n_head
    default_hd = n_embd // n_head if n_head else 0
    hd_k = _meta_int(info, "attention.key_length", default_hd) or default_hd
    hd_v = _meta_int(info, "attention.value_length", hd_k) or hd_k

    by_name = {t.name: t for t in info.tensors}
    embd = by_name.get("token_embd.weight")
    n_vocab = _meta_int(info, "vocab_size", 0)
    if embd is not None and len(embd.shape) >= 2:
        n_vocab = int(embd.shape[1])

    attn, recr = _layer_kinds(info, arch, n_layer)
    d_conv = _meta_int(info, "ssm.conv_kernel")
    d_inner = _meta_int(info, "ssm.inner_size")
    d_state = _meta_int(info, "ssm.state_size")
    groups = _meta_int(info, "ssm.group_count")
    conv_dim = d_inner + 2 * groups * d_state
    rs_per_layer = ((max(0, d_conv - 1)) * conv_dim + d_state * d_inner) * 4 if recr else 0

    dense = [0] * n_layer
    experts = [0] * n_layer
    expert_lists: list[list[ExpertTensor]] = [[] for _ in range(n_layer)]
    types: list[list[tuple[str, int, int, bool]]] = [[] for _ in range(n_layer)]
    token_embd_bytes = output_bytes = skipped = 0
    dense_params = expert_params = 0
    for t in info.tensors:
        layer = t.layer
        rows = int(t.shape[1]) if len(t.shape) >= 2 else 1
        if layer is None:
            if t.name.startswith("token_embd"):
                token_embd_bytes += t.n_bytes
            else:
                output_bytes += t.n_bytes
                dense_params += _n_elements(t)
            continue
        if layer >= n_layer:
            skipped += t.n_bytes
            continue
        types[layer].append((t.ggml_type.upper(), t.n_bytes, rows, t.is_routed_expert))
        if t.is_routed_expert:
            experts[layer] += t.n_bytes
            expert_lists[layer].append(ExpertTensor(t.name, t.n_bytes))
            expert_params += _n_elements(t)
        else:
            dense[layer] += t.n_bytes
            dense_params += _n_elements(t)
    tied = "output.weight" not in by_name
    if tied and embd is not None:
        output_bytes += embd.n_bytes  # TENSOR_DUPLICATED onto the output device
        dense_params += _n_elements(embd)

    return ModelFacts(
        arch=arch,
        name=name or str(info.get("general.name", None) or arch),
        n_layer_all=n_layer_all,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=hd_k,
        head_dim_v=hd_v,
        n_expert=_meta_int(info, "expert_count"),
        n_expert_used=_meta_int(info, "expert_used_count"),
        expert_ff=_meta_int(info, "expert_feed_forward_length"),
        n_vocab=n_vocab,
        ctx_native=_meta_int(info, "context_length", 0),
        attn_layers=attn,
        recr_layers=recr,
        rs_bytes_per_layer=rs_per_layer,
        ssm_conv_dim=conv_dim,
        token_embd_bytes=token_embd_bytes,
        output_bytes=output_bytes,
        output_tied=tied,
        dense_bytes=tuple(dense),
        expert_bytes=tuple(experts),
        expert_tensors=tuple(tuple(x) for x in expert_lists),
        dense_params=dense_params,
        expert_params=expert_params,
        skipped_bytes=skipped,
        has_shared_expert=any("shexp" in t.name for t in info.tensors),
        file_bytes=sum(t.n_bytes for t in info.tensors),
        layer_types=tuple(tuple(x) for x in types),
    )


def _layer_kinds(
    info: GGUFInfo, arch: str, n_layer: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(attention layers, recurrent layers) among the trunk blocks."""
    hybrid = arch in HYBRID_ARCHES or info.get("ssm.state_size", None) is not None
    if not hybrid:
        return tuple(range(n_layer)), ()
    interval = _meta_int(info, "full_attention_interval", 4) or 4
    attn = tuple(i for i in range(n_layer) if (i + 1) % interval == 0)
    recr = tuple(i for i in range(n_layer) if (i + 1) % interval != 0)
    return attn, recr


# --------------------------------------------------------------------------------------
# A layout and what it costs


@dataclass(frozen=True)
class Layout:
    """Where things go, in llama.cpp's terms.

    `n_cpu_moe` whole trunk layers (0..n-1) keep their routed experts on the CPU; the named
    `cpu_tensors` (routed-expert tensors of layer n) stay there too.
    """

    n_ctx: int
    kv_type: str = "f16"
    n_gpu_layers: int = -1  # llama.cpp semantics; ignored without a GPU
    n_cpu_moe: int = 0
    cpu_tensors: tuple[str, ...] = ()
    n_ubatch: int = 512
    flash_attn: bool = True
    use_gpu: bool = True


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

    @property
    def weights(self) -> int:
        return self.weights_dense + self.weights_experts

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.rs + self.compute + self.output


@dataclass(frozen=True)
class Usage:
    gpu: DeviceBytes
    cpu: DeviceBytes
    gpu_expert_layers: int  # trunk layers whose routed experts are all on the GPU
    first_gpu_layer: int  # trunk layers before this one sit wholly on the CPU


def first_gpu_layer(facts: ModelFacts, layout: Layout) -> int:
    """Index of the first block llama.cpp puts on the GPU (n_layer_all + 1 - n_gpu_layers)."""
    if not layout.use_gpu:
        return facts.n_layer_all + 1
    ngl = layout.n_gpu_layers
    k = facts.n_layer_all + 1 if ngl < 0 else min(ngl, facts.n_layer_all + 1)
    return max(0, facts.n_layer_all + 1 - k)


@dataclass(frozen=True)
class _Sums:
    """Suffix sums and prefix maxima over trunk layers, for O(1) pricing."""

    dense_suffix: tuple[int, ...]
    expert_suffix: tuple[int, ...]
    attn_suffix: tuple[int, ...]
    recr_suffix: tuple[int, ...]
    layer_max_prefix: tuple[int, ...]  # max over [0:i) of dense + experts
    expert_max_prefix: tuple[int, ...]  # max over [0:i) of experts


def _sums(facts: ModelFacts) -> _Sums:
    n = facts.n_layer
    attn = set(facts.attn_layers)
    recr = set(facts.recr_layers)

    def suffix(values: Sequence[int]) -> tuple[int, ...]:
        out = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            out[i] = out[i + 1] + values[i]
        return tuple(out)

    def prefix_max(values: Sequence[int]) -> tuple[int, ...]:
        out = [0] * (n + 1)
        for i in range(n):
            out[i + 1] = max(out[i], values[i])
        return tuple(out)

    per_layer = [d + e for d, e in zip(facts.dense_bytes, facts.expert_bytes, strict=True)]
    return _Sums(
        dense_suffix=suffix(facts.dense_bytes),
        expert_suffix=suffix(facts.expert_bytes),
        attn_suffix=suffix([1 if i in attn else 0 for i in range(n)]),
        recr_suffix=suffix([1 if i in recr else 0 for i in range(n)]),
        layer_max_prefix=prefix_max(per_layer),
        expert_max_prefix=prefix_max(facts.expert_bytes),
    )


def _tensor_bytes(facts: ModelFacts, layer: int, names: Iterable[str]) -> int:
    wanted = set(names)
    if not 0 <= layer < facts.n_layer:
        return 0
    return sum(t.n_bytes for t in facts.expert_tensors[layer] if t.name in wanted)


def usage(facts: ModelFacts, layout: Layout, cpu_flags: frozenset[str] = frozenset()) -> Usage:
    """Bytes per device for `layout` (see the module docstring for each rule)."""
    s = facts.sums
    n = facts.n_layer
    first = min(first_gpu_layer(facts, layout), n)
    output_on_gpu = layout.use_gpu and first_gpu_layer(facts, layout) <= facts.n_layer_all
    n_cpu_moe = min(max(0, layout.n_cpu_moe), n)
    boundary = n_cpu_moe  # the layer whose single tensors may stay on the CPU
    extra = _tensor_bytes(facts, boundary, layout.cpu_tensors) if boundary >= first else 0
    if not layout.use_gpu:
        first, output_on_gpu, extra = n, False, 0

    gpu_dense = s.dense_suffix[first] + (facts.output_bytes if output_on_gpu else 0)
    gpu_experts = s.expert_suffix[max(first, n_cpu_moe)] - extra
    cpu_dense = facts.total_dense_bytes - s.dense_suffix[first] + facts.token_embd_bytes
    if not output_on_gpu:
        # a tied output shares token_embd's data on the CPU: no second copy there
        cpu_dense += facts.output_bytes - (facts.token_embd_bytes if facts.output_tied else 0)
    cpu_experts = facts.total_expert_bytes - gpu_experts

    kv_layer = facts.kv_bytes_per_layer(layout.n_ctx, layout.kv_type)
    gpu_attn, gpu_recr = s.attn_suffix[first], s.recr_suffix[first]
    cpu_attn = len(facts.attn_layers) - gpu_attn
    cpu_recr = len(facts.recr_layers) - gpu_recr

    # Weights in host memory that big batches copy to the GPU, one layer's worth at a time.
    host_copy = 0
    if layout.use_gpu and layout.n_ubatch >= OP_OFFLOAD_MIN_BATCH:
        host_copy = max(s.layer_max_prefix[first], s.expert_max_prefix[n_cpu_moe], extra)
    gpu_compute, cpu_compute = compute_bytes(facts, layout, output_on_gpu, host_copy)
    repack = 0 if layout.use_gpu else repack_bytes(facts, cpu_flags)

    gpu = DeviceBytes(
        weights_dense=gpu_dense,
        weights_experts=gpu_experts,
        kv=gpu_attn * kv_layer,
        rs=gpu_recr * facts.rs_bytes_per_layer,
        compute=gpu_compute,
    )
    cpu = DeviceBytes(
        weights_dense=cpu_dense,
        weights_experts=cpu_experts,
        kv=cpu_attn * kv_layer,
        rs=cpu_recr * facts.rs_bytes_per_layer,
        compute=cpu_compute,
        output=facts.n_vocab * 4,
        repack=repack,
    )
    on_gpu = n - max(first, n_cpu_moe) - (1 if extra else 0)
    return Usage(gpu=gpu, cpu=cpu, gpu_expert_layers=max(0, on_gpu), first_gpu_layer=first)


def _with_slack(n: int) -> int:
    return int(n * (1 + COMPUTE_SLACK_FRACTION)) + COMPUTE_SLACK_BYTES if n else 0


def compute_bytes(
    facts: ModelFacts, layout: Layout, output_on_gpu: bool, host_copy: int
) -> tuple[int, int]:
    """(GPU, CPU) compute buffers: the peak phase of one n_ubatch-token graph, plus slack."""
    ub = max(1, layout.n_ubatch)
    cells = pad_ctx(layout.n_ctx)
    hidden = 2 * facts.n_embd * ub * 4
    logits = facts.n_vocab * ub * 4 + hidden
    # Attention phase, measured on CPU (Qwen3-30B shapes, 196k-320k cells): the f16 mask
    # (cells × n_ubatch) plus about 11 f32 activations of the query width per token.
    q_width = facts.n_head * facts.head_dim_k
    attn = cells * ub * 2 + 11 * q_width * ub * 4
    if not layout.flash_attn:
        # the materialized f32 scores, and the mask in f32
        attn += cells * ub * facts.n_head * 4 + cells * ub * 2
    moe = ub * facts.n_expert_used * (3 * facts.expert_ff + facts.n_embd) * 4
    moe += ub * facts.n_expert * 4 + hidden
    ssm = ub * facts.ssm_conv_dim * 4 * 2 + hidden if facts.is_hybrid else 0
    if not layout.use_gpu:
        return 0, _with_slack(max(logits, attn, moe, ssm))
    gpu_peak = max(attn, moe + host_copy, ssm, logits if output_on_gpu else 0)
    # Host side: graph inputs (mask, token ids, positions) and the embedding lookup; the
    # logits too when the output layer stays on the CPU.
    mask_f32 = cells * ub * 4  # the host builds the mask; counted in f32 to be safe
    cpu_peak = max(mask_f32 + hidden, logits if not output_on_gpu else 0)
    return _with_slack(gpu_peak), _with_slack(cpu_peak)


def repack_bytes(facts: ModelFacts, cpu_flags: frozenset[str]) -> int:
    """Bytes of CPU matmul weights llama.cpp repacks on a CPU-only run of this machine."""
    total = 0
    for layer in facts.layer_types:
        for ggml_type, n_bytes, rows, _expert in layer:
            flag = REPACK_TYPES.get(ggml_type)
            if flag is not None and flag in cpu_flags and rows % 8 == 0:
                total += n_bytes
    return total


# --------------------------------------------------------------------------------------
# Speed


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
