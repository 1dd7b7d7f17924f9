"""Write a full-size random-weight Qwen MoE GGUF with the real tensor names, shapes and types.

Contract: `write_model(path, model, ...)` writes a GGUF whose tensors have exactly the names,
ggml shapes and K-quant types of Qwen3-30B-A3B (or Qwen3.5-35B-A3B) quantized to Q4_K_M by
llama.cpp's llama-quantize, filled with random blocks whose scale fields are small and
finite. llama.cpp's kernels cost the same whatever the weights hold, so such a file decodes
at the real model's speed and allocates the real model's memory: it stands in for the
download in GPU benchmarks (placement, planner accuracy, tok/s). The text it writes is
gibberish. The writer streams: it writes the header and tensor infos first, then each
tensor's data in chunks of at most `CHUNK_BYTES`, so a 17 GB file needs ~100 MB of RAM.

It must not touch the network or qwenrun's internals; it only uses the `gguf` package and
the tokenizer helpers of `qwenrun.synthetic.tiny_gguf` (byte-level BPE with Qwen's special
tokens, padded to the model's vocabulary size).

The type recipe is llama-quant.cpp's `llama_tensor_get_type_impl` for LLAMA_FTYPE_MOSTLY_Q4_K_M
at the llama.cpp commit llama-cpp-python 0.3.36 vendors: Q4_K by default; Q6_K for
`output.weight`; Q6_K for `ffn_down*` (routed and shared) and for `attn_v` / `attn_qkv` on
the layers where `use_more_bits(i, n)` holds; F32 for 1-D tensors, norms, routers
(`ffn_gate_inp`) and `ssm_conv1d`, which llama-quantize leaves alone.

    python benchmarks/synthetic_model.py --out /data/qwen3-30b-a3b-synth-Q4_K_M.gguf
    python benchmarks/synthetic_model.py --model qwen3.5-35b-a3b --out /data/q35.gguf
    python benchmarks/synthetic_model.py --layers 2 --out /tmp/small.gguf   # quick check
    python benchmarks/synthetic_model.py --plan                             # table, no file
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from qwenrun.synthetic.kquant import random_blocks
from qwenrun.synthetic.tiny_gguf import add_tokenizer, build_vocab, template_text

Q = gguf.GGMLQuantizationType
CHUNK_BYTES = 64 << 20  # random data generated and written per step


@dataclass(frozen=True)
class SynthShape:
    """The config.json numbers that fix every tensor (catalog.md §1)."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    vocab_size: int
    context_length: int
    rope_freq_base: float
    n_ff: int  # feed_forward_length key (unused by MoE layers; written as real files do)
    template: str  # bundled chat template name
    shexp_ff: int = 0
    # Gated DeltaNet (hybrids only)
    ssm_state: int = 0
    ssm_groups: int = 0
    ssm_v_heads: int = 0
    ssm_conv: int = 0
    full_attention_interval: int = 1
    rope_sections: tuple[int, ...] = ()

    @property
    def hybrid(self) -> bool:
        return self.arch in ("qwen35moe", "qwen3next")

    def is_attention_layer(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval == 0


MODELS: dict[str, SynthShape] = {
    "qwen3-30b-a3b": SynthShape(
        name="qwen3-30b-a3b",
        arch="qwen3moe",
        n_layer=48,
        n_embd=2048,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_expert=128,
        n_expert_used=8,
        expert_ff=768,
        vocab_size=151_936,
        context_length=40_960,
        rope_freq_base=1e6,
        n_ff=6144,
        template="qwen3",
    ),
    "qwen3.5-35b-a3b": SynthShape(
        name="qwen3.5-35b-a3b",
        arch="qwen35moe",
        n_layer=40,
        n_embd=2048,
        n_head=16,
        n_head_kv=2,
        head_dim=256,
        n_expert=256,
        n_expert_used=8,
        expert_ff=512,
        shexp_ff=512,
        vocab_size=248_320,
        context_length=262_144,
        rope_freq_base=1e7,
        n_ff=512,
        template="qwen3.5",
        ssm_state=128,
        ssm_groups=16,
        ssm_v_heads=32,
        ssm_conv=4,
        full_attention_interval=4,
        rope_sections=(11, 11, 10, 0),
    ),
}


# --------------------------------------------------------------------------------------
# Which tensors, in which type


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write. `ne` is ggml order (ne0, the row length, first)."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    ne: tuple[int, ...]
    fill: str  # "quant" (random blocks), "ones", "zeros", "normal", "conv", "neg"

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block * size

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's rule for the layers that get more bits (C integer division)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _more_bits_type(layer: int, n_layer: int) -> gguf.GGMLQuantizationType:
    return Q.Q6_K if use_more_bits(layer, n_layer) else Q.Q4_K


def _matrix(name: str, qtype: gguf.GGMLQuantizationType, *ne: int) -> TensorPlan:
    return TensorPlan(name, qtype, tuple(ne), "quant")


def _vector(name: str, n: int, fill: str = "ones") -> TensorPlan:
    return TensorPlan(name, Q.F32, (n,), fill)


def _attention(s: SynthShape, p: str, i: int, n: int) -> list[TensorPlan]:
    E, D = s.n_embd, s.head_dim
    # The hybrids gate attention: attn_q holds a query and a gate per head.
    q_rows = 2 * s.n_head * D if s.hybrid else s.n_head * D
    return [
        _matrix(p + "attn_q.weight", Q.Q4_K, E, q_rows),
        _matrix(p + "attn_k.weight", Q.Q4_K, E, s.n_head_kv * D),
        _matrix(p + "attn_v.weight", _more_bits_type(i, n), E, s.n_head_kv * D),
        _matrix(p + "attn_output.weight", Q.Q4_K, s.n_head * D, E),
        _vector(p + "attn_q_norm.weight", D),
        _vector(p + "attn_k_norm.weight", D),
    ]


def _delta_net(s: SynthShape, p: str, i: int, n: int) -> list[TensorPlan]:
    E, Rv = s.n_embd, s.ssm_v_heads
    kd, vd = s.ssm_state * s.ssm_groups, s.ssm_state * s.ssm_v_heads
    cd = 2 * kd + vd
    return [
        # llama-quant counts attn_qkv as an attn_v-like tensor (category_is_attn_v).
        _matrix(p + "attn_qkv.weight", _more_bits_type(i, n), E, cd),
        _matrix(p + "attn_gate.weight", Q.Q4_K, E, vd),
        # ssm_conv1d stays F32: llama-quantize skips it and the CPU kernel needs f32 rows.
        TensorPlan(p + "ssm_conv1d.weight", Q.F32, (s.ssm_conv, cd), "conv"),
        _vector(p + "ssm_dt.bias", Rv, "zeros"),
        # ssm_a holds -exp(A_log): negative, and has no ".weight" suffix.
        _vector(p.rstrip(".") + ".ssm_a", Rv, "neg"),
        _matrix(p + "ssm_beta.weight", Q.Q4_K, E, Rv),
        _matrix(p + "ssm_alpha.weight", Q.Q4_K, E, Rv),
        _vector(p + "ssm_norm.weight", s.ssm_state),
        _matrix(p + "ssm_out.weight", Q.Q4_K, vd, E),
    ]


def _layer(s: SynthShape, i: int, n: int) -> list[TensorPlan]:
    E, X, Fx = s.n_embd, s.n_expert, s.expert_ff
    p = f"blk.{i}."
    out = [_vector(p + "attn_norm.weight", E)]
    if s.hybrid and not s.is_attention_layer(i):
        out += _delta_net(s, p, i, n)
    else:
        out += _attention(s, p, i, n)
    out.append(_vector(p + ("post_attention_norm.weight" if s.hybrid else "ffn_norm.weight"), E))
    down = _more_bits_type(i, n)
    out += [
        TensorPlan(p + "ffn_gate_inp.weight", Q.F32, (E, X), "normal"),
        _matrix(p + "ffn_gate_exps.weight", Q.Q4_K, E, Fx, X),
        _matrix(p + "ffn_up_exps.weight", Q.Q4_K, E, Fx, X),
        _matrix(p + "ffn_down_exps.weight", down, Fx, E, X),
    ]
    if s.shexp_ff:
        Fs = s.shexp_ff
        out += [
            _vector(p + "ffn_gate_inp_shexp.weight", E, "normal"),
            _matrix(p + "ffn_gate_shexp.weight", Q.Q4_K, E, Fs),
            _matrix(p + "ffn_up_shexp.weight", Q.Q4_K, E, Fs),
            _matrix(p + "ffn_down_shexp.weight", down, Fs, E),
        ]
    return out


def plan_tensors(shape: SynthShape) -> list[TensorPlan]:
    """Every tensor of the file, in file order: globals, then blocks 0..n-1."""
    E, V = shape.n_embd, shape.vocab_size
    tensors = [
        _matrix("token_embd.weight", Q.Q4_K, E, V),
        _vector("output_norm.weight", E),
        _matrix("output.weight", Q.Q6_K, E, V),
    ]
    for i in range(shape.n_layer):
        tensors += _layer(shape, i, shape.n_layer)
    return tensors


def resolve_shape(
    model: str,
    *,
    layers: int | None = None,
    vocab_size: int | None = None,
    experts: int | None = None,
) -> SynthShape:
    """A catalog shape, optionally cut down (fewer layers, a smaller vocab, fewer experts).

    `layers` keeps every per-layer shape; the Q4_K_M recipe then follows the new block
    count, as llama-quantize would for such a file. `vocab_size` and `experts` change
    shapes and exist only to make small files for quick checks.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    shape = MODELS[model]
    for what, value in (("--layers", layers), ("--vocab-size", vocab_size), ("--experts", experts)):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be at least 1, not {value}")
    if layers is not None:
        if shape.hybrid and layers < shape.full_attention_interval:
            # Fewer blocks than the interval leaves no attention layer: llama.cpp aborts.
            raise ValueError(f"{model} needs --layers >= {shape.full_attention_interval}")
        shape = replace(shape, n_layer=layers)
    if vocab_size is not None:
        shape = replace(shape, vocab_size=vocab_size)
    if experts is not None:
        shape = replace(shape, n_expert=experts, n_expert_used=min(shape.n_expert_used, experts))
    return shape


# --------------------------------------------------------------------------------------
# Random data with valid, small scale fields


def _float_values(t: TensorPlan, rng: np.random.Generator) -> np.ndarray:
    n = t.n_elements
    if t.fill == "ones":
        return np.ones(n, dtype=np.float32)
    if t.fill == "zeros":
        return np.zeros(n, dtype=np.float32)
    if t.fill == "normal":  # routers: logits with std ~0.9 spread the top-k choices
        return rng.normal(0.0, 0.02, size=n).astype(np.float32)
    if t.fill == "conv":
        return rng.normal(0.0, 0.2, size=n).astype(np.float32)
    if t.fill == "neg":
        return -rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    raise ValueError(f"unknown fill {t.fill!r}")


def tensor_chunks(
    t: TensorPlan,
    rng: np.random.Generator,
    bitgen: np.random.BitGenerator,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[np.ndarray]:
    """The tensor's bytes, in pieces of at most `chunk_bytes` (whole blocks)."""
    if t.fill != "quant":
        yield _float_values(t, rng)
        return
    block_bytes = gguf.GGML_QUANT_SIZES[t.ggml_type][1]
    total = t.n_bytes // block_bytes
    step = max(1, chunk_bytes // block_bytes)
    for start in range(0, total, step):
        yield random_blocks(t.ggml_type, min(step, total - start), bitgen)


# --------------------------------------------------------------------------------------
# The file


def _add_metadata(w: gguf.GGUFWriter, s: SynthShape, stem: str) -> None:
    a = s.arch
    w.add_name(stem)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    u = w.add_uint32
    u(f"{a}.context_length", s.context_length)
    u(f"{a}.embedding_length", s.n_embd)
    u(f"{a}.block_count", s.n_layer)
    u(f"{a}.feed_forward_length", s.n_ff)
    u(f"{a}.attention.head_count", s.n_head)
    u(f"{a}.attention.head_count_kv", s.n_head_kv)
    u(f"{a}.attention.key_length", s.head_dim)
    u(f"{a}.attention.value_length", s.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", s.rope_freq_base)
    # The hybrids rotate a quarter of each head (partial_rotary_factor 0.25).
    u(f"{a}.rope.dimension_count", s.head_dim // 4 if s.hybrid else s.head_dim)
    if s.rope_sections:
        w.add_array(f"{a}.rope.dimension_sections", list(s.rope_sections))
    u(f"{a}.expert_count", s.n_expert)
    u(f"{a}.expert_used_count", s.n_expert_used)
    u(f"{a}.expert_feed_forward_length", s.expert_ff)
    if s.shexp_ff:
        u(f"{a}.expert_shared_feed_forward_length", s.shexp_ff)
    if s.hybrid:
        u(f"{a}.ssm.conv_kernel", s.ssm_conv)
        u(f"{a}.ssm.state_size", s.ssm_state)
        u(f"{a}.ssm.group_count", s.ssm_groups)
        u(f"{a}.ssm.time_step_rank", s.ssm_v_heads)
        u(f"{a}.ssm.inner_size", s.ssm_state * s.ssm_v_heads)
        u(f"{a}.full_attention_interval", s.full_attention_interval)
        u(f"{a}.nextn_predict_layers", 0)  # no MTP block


def _pad_to_alignment(fout: BinaryIO, alignment: int) -> None:
    pad = -fout.tell() % alignment
    if pad:
        fout.write(b"\0" * pad)


def write_model(
    path: str | Path,
    shape: SynthShape,
    *,
    seed: int = 0,
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Path:
    """Write the synthetic GGUF and return its path. Streams: no tensor is held whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = plan_tensors(shape)
    writer = gguf.GGUFWriter(path, shape.arch)
    _add_metadata(writer, shape, path.stem)
    add_tokenizer(writer, shape.arch, build_vocab(shape.vocab_size), template_text(shape.template))
    for t in tensors:
        # Quantized data is handed over as bytes: the writer turns the byte shape back
        # into the element shape for the tensor info.
        if t.fill == "quant":
            byte_shape = gguf.quant_shape_to_byte_shape(t.numpy_shape, t.ggml_type)
            writer.add_tensor_info(
                t.name, byte_shape, np.dtype(np.uint8), t.n_bytes, raw_dtype=t.ggml_type
            )
        else:
            writer.add_tensor_info(t.name, t.numpy_shape, np.dtype(np.float32), t.n_bytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    rng = np.random.default_rng(seed)
    bitgen = np.random.PCG64(seed)
    total = sum(t.n_bytes for t in tensors)
    done, last_report, t0 = 0, 0, time.monotonic()
    for t in tensors:
        # Same layout as GGUFWriter: each tensor starts on an alignment boundary, which is
        # what the offsets in the tensor infos (cumulative padded sizes) assume.
        _pad_to_alignment(fout, writer.data_alignment)
        for chunk in tensor_chunks(t, rng, bitgen, chunk_bytes):
            chunk.tofile(fout)
            done += chunk.nbytes
        if progress and done - last_report >= 1 << 30:
            last_report = done
            rate = done / max(time.monotonic() - t0, 1e-9) / 1e9
            print(f"  {done / 1e9:6.2f} / {total / 1e9:.2f} GB  ({rate:.1f} GB/s)", file=sys.stderr)
    _pad_to_alignment(fout, writer.data_alignment)
    writer.close()
    return path


def summary(shape: SynthShape) -> str:
    """Bytes by role and type, for `--plan` and the log."""
    tensors = plan_tensors(shape)
    by_type: dict[str, int] = {}
    experts = 0
    for t in tensors:
        by_type[t.ggml_type.name] = by_type.get(t.ggml_type.name, 0) + t.n_bytes
        if "_exps." in t.name:
            experts += t.n_bytes
    total = sum(by_type.values())
    lines = [
        f"{shape.name} ({shape.arch}): {shape.n_layer} layers, {shape.n_expert} experts, "
        f"vocab {shape.vocab_size}, {len(tensors)} tensors",
        f"  tensor data {total:,} B ({total / 2**30:.2f} GiB); "
        f"routed experts {experts:,} B ({experts / 2**30:.2f} GiB)",
    ]
    lines += [f"  {name:5s} {n:>16,} B" for name, n in sorted(by_type.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, help="where to write the .gguf")
    ap.add_argument("--layers", type=int, help="fewer blocks, same per-layer shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, help="quick checks only: a smaller vocabulary")
    ap.add_argument("--experts", type=int, help="quick checks only: fewer routed experts")
    ap.add_argument("--plan", action="store_true", help="print the tensor summary, write nothing")
    args = ap.parse_args(argv)
    try:
        shape = resolve_shape(
            args.model, layers=args.layers, vocab_size=args.vocab_size, experts=args.experts
        )
    except ValueError as err:
        ap.error(str(err))
    print(summary(shape), file=sys.stderr)
    if args.plan:
        return 0
    if args.out is None:
        ap.error("--out is required unless --plan is given")
    t0 = time.monotonic()
    path = write_model(args.out, shape, seed=args.seed, progress=True)
    size = path.stat().st_size
    print(f"wrote {path} ({size:,} B) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
