"""The `qwen4exp` (Qwen3.8-Flash-Next) part of the tiny random-weight GGUFs: keys and tensors.

Contract: `Qwen4ExpDims` fixes every shape; `add_hparams` writes the architecture's keys and
`tensors` returns its tensors (numpy order, the reverse of ggml's ne) besides the token
embedding and output matrix, which `tiny_gguf` writes for every architecture, as it writes the
vocabulary, tokenizer, template and shards: `tiny_gguf.write_model(dest, "qwen4exp", ...)` is
the way in. The set is exactly what the llama.cpp that llama-cpp-python 0.3.36 vendors loads
(src/models/qwen4exp.cpp): no plain norms (hyper-connection mixers replace them), every
layer with two HC mixers and a MoE with a gated shared expert, Gated DeltaNet layers with a
full-attention layer (gated, with the lightning indexer's tensors) every
`full_attention_interval`, one n-gram (PLE) module on a linear layer, and the n-gram table
`per_layer_token_embd`, streamed to the file so it can be made as large as a test needs.

Steering (`steer >= 1`) keeps residual channel 0 of every HC stream a constant lane: the
embedding's 0.2 (set by tiny_gguf) is copied into each stream; no block reads it (lane 0 of
every HC and PLE-query gamma is zero, so the mixers' normalised input has a zero lane and the
down/up/inject matrices never see it), and no block writes it (row 0 of every matrix that
adds to the residual — attention and GDN outputs, routed and shared expert down projections,
the PLE value — is zero, and so are the PLE convolution's lane channels). The final mixer,
whose gamma is all ones, reads the lane; the lane rows of its up projection are zero, so its
gate there is exactly sigmoid(0) = 1/2 and the output matrix sees a lane of 0.1 × the mean of
1/rms over the streams, which tiny_gguf's output rows turn into the bans. The GDN output and
the PLE convolution taps are kept small, so the residual (and its rms) does not grow layer by
layer until the lane is drowned: measured, the banned logits stay 26 or more below the best
allowed one at 4 to 12 layers (the test file checks the behaviour: ASCII, max_tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import gguf
import numpy as np

from qwenrun.synthetic.kquant import random_blocks
from qwenrun.synthetic.weights import Weights

ARCH = "qwen4exp"
Q = gguf.GGMLQuantizationType
TABLE_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
# Odd 64-bit multipliers of the n-gram hash (any odd values work; these are fixed so a file
# does not change with the seed's other draws).
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Qwen4ExpDims:
    """The numbers that fix every `qwen4exp` tensor shape (defaults: a verified tiny model).

    n_embd is not free: the PLE key reads the gathered rows of all PLE heads as one vector,
    so n_embd = ple_row × (ngram − 1) × heads_per_ngram (64 by default; ple_row=64 gives
    256, whose matrices a K-quant can hold). `compress_ratio=0` leaves
    `attention.compress_ratios` out: the attention layers run dense, without QSA (the indexer
    tensors and the indexer cache exist either way). `ple_rows` is the n-gram table's row
    count, split evenly between the PLE heads; `ple_type` its type (None: the model's float
    type, q8_0 for a K-quant model, as real quants keep it at 4 bits or more).
    """

    ple_row: int = 16
    ngram: int = 3
    heads_per_ngram: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    expert_ff: int = 32
    shexp_ff: int = 32
    # Gated DeltaNet: inner size = ssm_state * ssm_v_heads, v-heads a multiple of groups.
    ssm_state: int = 16
    ssm_groups: int = 2
    ssm_v_heads: int = 4
    ssm_conv: int = 4
    full_attention_interval: int = 4
    hc: int = 4
    hc_rank: int = 8
    idx_heads: int = 4
    idx_dim: int = 32  # the indexer ropes its keys with the main n_rot: keep it >= head_dim/4
    idx_top_k: int = 2048
    compress_ratio: int = 4
    ple_layer: int = 1
    ple_conv: int = 4
    ple_rows: int = 4096
    ple_type: str | None = None

    @property
    def ple_heads(self) -> int:
        return (self.ngram - 1) * self.heads_per_ngram

    @property
    def n_embd(self) -> int:
        return self.ple_row * self.ple_heads

    @property
    def stream_lanes(self) -> tuple[int, ...]:
        """The steering lane of every HC stream: channel 0 of each n_embd in hc·n_embd."""
        return tuple(s * self.n_embd for s in range(self.hc))

    def is_attention_layer(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval == 0

    def check(self, n_layer: int, quantized_model: bool = False) -> None:
        """Refuse the shapes llama.cpp would reject, or abort on, with the reason."""
        if not any(self.is_attention_layer(i) for i in range(n_layer)):
            raise ValueError(
                f"qwen4exp needs a full-attention layer: n_layer {n_layer} must be at least "
                f"full_attention_interval {self.full_attention_interval}"
            )
        if not 0 <= self.ple_layer < n_layer or self.is_attention_layer(self.ple_layer):
            raise ValueError(f"ple_layer {self.ple_layer} must be a linear (GDN) layer")
        if not 2 <= self.ngram <= 8 or not 0 < self.ple_heads <= 64:
            raise ValueError("ngram must be 2..8 and (ngram - 1) * heads_per_ngram 1..64")
        if self.ple_rows < self.ple_heads:
            raise ValueError(f"ple_rows must be at least the {self.ple_heads} PLE heads")
        if self.idx_dim < self.head_dim // 4:
            raise ValueError("idx_dim must be at least the rotary width head_dim / 4")
        if self.ssm_v_heads % self.ssm_groups:
            raise ValueError("ssm_v_heads must be a multiple of ssm_groups")
        if self.table_type(quantized_model, np.float32) == Q.Q8_0 and self.ple_row % 32:
            raise ValueError("a q8_0 n-gram table needs ple_row to be a multiple of 32")

    def table_type(
        self, quantized_model: bool, dtype: type[np.floating]
    ) -> gguf.GGMLQuantizationType:
        if self.ple_type is not None:
            return TABLE_TYPES[self.ple_type]
        if quantized_model:
            return Q.Q8_0
        return Q.F16 if dtype is np.float16 else Q.F32

    def head_ranges(self) -> tuple[list[int], list[int]]:
        """(offsets, vocab sizes) of the PLE heads: equal slices of the table."""
        per_head = self.ple_rows // self.ple_heads
        return [h * per_head for h in range(self.ple_heads)], [per_head] * self.ple_heads


@dataclass(frozen=True)
class NgramTable:
    """`per_layer_token_embd`: random rows, made and written a chunk at a time.

    GGUFWriter reads only `shape`, `dtype` and `nbytes` of a tensor and writes it with
    `tofile`, so a table of gigabytes never sits in memory. A q8_0 table is handed over as
    its bytes (`raw_dtype`), as the writer takes quantized data.
    """

    rows: int
    row: int
    qtype: gguf.GGMLQuantizationType
    seed: int

    @property
    def raw_dtype(self) -> gguf.GGMLQuantizationType | None:
        return self.qtype if self.qtype == Q.Q8_0 else None

    @property
    def dtype(self) -> np.dtype[np.generic]:
        if self.qtype == Q.F32:
            return np.dtype(np.float32)
        return np.dtype(np.float16 if self.qtype == Q.F16 else np.uint8)

    @property
    def row_bytes(self) -> int:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.row // block_elems * block_bytes

    @property
    def shape(self) -> tuple[int, int]:
        width = self.row_bytes if self.qtype == Q.Q8_0 else self.row
        return (self.rows, width)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def chunks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        bitgen = np.random.PCG64(self.seed)
        step = max(1, _CHUNK_BYTES // self.row_bytes)
        for start in range(0, self.rows, step):
            n = min(step, self.rows - start)
            if self.qtype == Q.Q8_0:
                yield random_blocks(Q.Q8_0, n * self.row // 32, bitgen)
            else:
                # float32 draws: a float64 intermediate would double the chunk's memory
                rows = rng.standard_normal((n, self.row), dtype=np.float32) * np.float32(0.02)
                yield rows.astype(self.dtype, copy=False)

    def tofile(self, fout: BinaryIO) -> None:
        for chunk in self.chunks():
            chunk.tofile(fout)


Tensor = tuple[str, "np.ndarray | NgramTable"]


def add_hparams(
    writer: gguf.GGUFWriter, n_layer: int, dims: Qwen4ExpDims, context_length: int, eos_id: int
) -> None:
    """The keys src/models/qwen4exp.cpp and the generic loader read (see the contract)."""
    a, d = ARCH, dims
    u32, f32 = writer.add_uint32, writer.add_float32
    u32(f"{a}.context_length", context_length)
    u32(f"{a}.embedding_length", d.n_embd)
    u32(f"{a}.block_count", n_layer)
    u32(f"{a}.feed_forward_length", d.expert_ff)
    u32(f"{a}.attention.head_count", d.n_head)
    u32(f"{a}.attention.head_count_kv", d.n_head_kv)
    u32(f"{a}.attention.key_length", d.head_dim)
    u32(f"{a}.attention.value_length", d.head_dim)
    f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    f32(f"{a}.rope.freq_base", 1e7)
    n_rot = d.head_dim // 4  # partial rotary, as in the real model (64 of 256)
    u32(f"{a}.rope.dimension_count", n_rot)
    # IMRoPE sections: exactly four, summing to n_rot / 2 (the real model: 11, 11, 10, 0).
    half = n_rot // 2
    writer.add_array(f"{a}.rope.dimension_sections", [half - half // 2, half // 4, half // 4, 0])
    u32(f"{a}.expert_count", d.n_expert)
    u32(f"{a}.expert_used_count", d.n_expert_used)
    u32(f"{a}.expert_feed_forward_length", d.expert_ff)
    u32(f"{a}.expert_shared_feed_forward_length", d.shexp_ff)
    u32(f"{a}.ssm.conv_kernel", d.ssm_conv)
    u32(f"{a}.ssm.state_size", d.ssm_state)
    u32(f"{a}.ssm.group_count", d.ssm_groups)
    u32(f"{a}.ssm.time_step_rank", d.ssm_v_heads)
    u32(f"{a}.ssm.inner_size", d.ssm_state * d.ssm_v_heads)
    u32(f"{a}.full_attention_interval", d.full_attention_interval)
    u32(f"{a}.hyper_connection.count", d.hc)
    u32(f"{a}.hyper_connection.low_rank", d.hc_rank)
    u32(f"{a}.attention.indexer.head_count", d.idx_heads)
    u32(f"{a}.attention.indexer.key_length", d.idx_dim)
    u32(f"{a}.attention.indexer.top_k", d.idx_top_k)
    if d.compress_ratio:
        # One entry per layer; only the attention layers read theirs.
        writer.add_array(f"{a}.attention.compress_ratios", [d.compress_ratio] * n_layer)
    writer.add_array(f"{a}.ple.layers", [d.ple_layer])
    u32(f"{a}.ple.ngram_size", d.ngram)
    u32(f"{a}.ple.heads_per_ngram", d.heads_per_ngram)
    u32(f"{a}.ple.conv_kernel", d.ple_conv)
    u32(f"{a}.ple.eos_token_id", eos_id)
    u32(f"{a}.embedding_length_per_layer_input", d.ple_row)
    offsets, sizes = d.head_ranges()
    # The loader type-checks these three: UINT64 arrays, or "wrong array element type".
    u64 = gguf.GGUFValueType.UINT64
    arr = gguf.GGUFValueType.ARRAY
    multipliers = list((_MULTIPLIERS * 2)[: d.ngram])
    writer.add_key_value(f"{a}.ple.layer_multipliers", multipliers, arr, sub_type=u64)
    writer.add_key_value(f"{a}.ple.head_offsets", offsets, arr, sub_type=u64)
    writer.add_key_value(f"{a}.ple.head_vocab_sizes", sizes, arr, sub_type=u64)


def tensors(
    n_layer: int,
    dims: Qwen4ExpDims,
    w: Weights,
    *,
    quantized: bool = False,
    seed: int = 0,
) -> list[Tensor]:
    """Every `qwen4exp` tensor except `token_embd` and `output` (tiny_gguf's, steered there)."""
    dims.check(n_layer, quantized)
    d = dims
    E, hc, r = d.n_embd, d.hc, d.hc_rank
    out: list[Tensor] = [
        ("output_hc_norm.weight", w.gamma(hc, E, reads_residual=False)),
        ("output_hc_down.weight", w.matrix(r, hc * E)),
        # Its lane rows zero: the final gate is exactly 1/2 on the lane, whatever the input.
        ("output_hc_up.weight", w.matrix(hc * E, r, lanes=d.stream_lanes)),
    ]
    for i in range(n_layer):
        out += _layer(i, d, w)
    # Last in the file: a memory-mapped load maps the span of the other tensors as one
    # buffer, and a table lying inside that span would be counted there too when it is
    # read lazily (its own mapping), making llama.cpp's buffer sizes overstate the memory.
    table = NgramTable(d.ple_rows, d.ple_row, d.table_type(quantized, w.dtype), seed + 1)
    return [*out, ("per_layer_token_embd.weight", table)]


def _layer(i: int, d: Qwen4ExpDims, w: Weights) -> list[Tensor]:
    E, hc, r = d.n_embd, d.hc, d.hc_rank
    H, Hkv, D = d.n_head, d.n_head_kv, d.head_dim
    p = f"blk.{i}."
    out: list[Tensor] = []
    for mixer in ("attn", "ffn"):  # before the token mixer, before the MoE
        out += [
            (f"{p}hc_{mixer}_norm.weight", w.gamma(hc, E, reads_residual=True)),
            (f"{p}hc_{mixer}_down.weight", w.matrix(r, hc * E)),
            (f"{p}hc_{mixer}_up.weight", w.matrix(hc * E, r)),
            (f"{p}hc_{mixer}_inject.weight", w.matrix(hc, hc * E)),
        ]
    if d.is_attention_layer(i):
        out += [
            (p + "attn_q.weight", w.matrix(2 * H * D, E)),  # query and gate per head
            (p + "attn_k.weight", w.matrix(Hkv * D, E)),
            (p + "attn_v.weight", w.matrix(Hkv * D, E)),
            (p + "attn_output.weight", w.matrix(E, H * D, lanes=(0,))),
            (p + "attn_q_norm.weight", w.norm(D)),
            (p + "attn_k_norm.weight", w.norm(D)),
            (p + "indexer.q_proj.weight", w.matrix(d.idx_heads * d.idx_dim, E)),
            (p + "indexer.k_proj.weight", w.matrix(d.idx_dim, E)),
            (p + "indexer.q_norm.weight", w.norm(d.idx_dim)),
            (p + "indexer.k_norm.weight", w.norm(d.idx_dim)),
        ]
    else:
        dS, G, Rv, dC = d.ssm_state, d.ssm_groups, d.ssm_v_heads, d.ssm_conv
        kd, vd = dS * G, dS * Rv
        cd = 2 * kd + vd
        out += [
            (p + "attn_qkv.weight", w.matrix(cd, E)),
            (p + "attn_gate.weight", w.matrix(vd, E)),
            # F32: the CPU conv kernel asserts float rows.
            (p + "ssm_conv1d.weight", w.rng.normal(0, 0.2, size=(cd, dC)).astype(np.float32)),
            (p + "ssm_dt.bias", np.zeros(Rv, dtype=np.float32)),
            # -exp(A_log): negative, and no ".weight" suffix.
            (f"blk.{i}.ssm_a", -w.rng.uniform(0.5, 1.5, size=Rv).astype(np.float32)),
            (p + "ssm_beta.weight", w.matrix(Rv, E)),
            (p + "ssm_alpha.weight", w.matrix(Rv, E)),
            (p + "ssm_norm.weight", w.norm(dS)),
            # Small: Qwen3.8's GDN gates with a sigmoid (about 1/2 here, where Qwen3.5's silu
            # gives about 0), and a residual grown by every block would drown the lane.
            (p + "ssm_out.weight", w.matrix(E, vd, lanes=(0,), scale=0.002)),
        ]
    if i == d.ple_layer:
        out += [
            (p + "ple_key.weight", w.matrix(hc * E, E)),
            (p + "ple_value.weight", w.matrix(E, E, lanes=(0,))),
            (p + "ple_norm_key.weight", w.gamma(hc, E, reads_residual=False)),
            (p + "ple_norm_query.weight", w.gamma(hc, E, reads_residual=True)),
            (p + "ple_norm_conv.weight", w.gamma(hc, E, reads_residual=True)),
            # Small taps: the convolution adds straight to every stream of the residual.
            (
                p + "ple_conv1d.weight",
                w.matrix(hc * E, d.ple_conv, lanes=d.stream_lanes, scale=0.002),
            ),
        ]
    X, Fx, Fs = d.n_expert, d.expert_ff, d.shexp_ff
    out += [
        (p + "ffn_gate_inp.weight", w.matrix(X, E)),
        (p + "ffn_gate_exps.weight", w.matrix(X, Fx, E)),
        (p + "ffn_up_exps.weight", w.matrix(X, Fx, E)),
        (p + "ffn_down_exps.weight", w.matrix(X, E, Fx, lanes=(0,))),
        (p + "ffn_gate_inp_shexp.weight", np.full(E, 0.02, dtype=np.float32)),
        (p + "ffn_gate_shexp.weight", w.matrix(Fs, E)),
        (p + "ffn_up_shexp.weight", w.matrix(Fs, E)),
        (p + "ffn_down_shexp.weight", w.matrix(E, Fs, lanes=(0,))),
    ]
    return out
