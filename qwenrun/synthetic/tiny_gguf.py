"""Tiny random-weight GGUFs with real Qwen architectures, for tests and benchmarks.

Contract: `write_model(dest_dir, arch, ...)` writes a GGUF (or a split set) that the pinned
llama.cpp loads and runs: `qwen3` (dense), `qwen3moe`, and the hybrids `qwen3next`,
`qwen35moe` and `qwen4exp` (Qwen3.8-Flash-Next; its keys and tensors are in `qwen4exp.py`),
with Qwen's byte-level BPE layout and special tokens, and Qwen's chat templates (see
templates/README.md). Nothing here touches the network or qwenrun's
internals; it only writes files with the `gguf` package.

The recipe (shapes, required keys, pitfalls) is the one verified against llama.cpp at the
commit llama-cpp-python 0.3.36 vendors. Weights are random, so text is gibberish; what
matters is that loading, placement, decoding and sampling are real.

Steering (`steer`) makes sampling from random weights safe: residual channel 0 becomes a
constant bias lane that no block reads or writes, and the output layer uses it to push
chosen tokens' logits far down. steer=1 bans the UTF-8 bytes 0x80-0xFF (completions are
ASCII, `max_tokens` is honoured); steer=2 also bans the special tokens, so a completion
always runs to `max_tokens`; steer=0 leaves the raw random model, which can emit endless
UTF-8 lead bytes — the case the engine's `max_tokens` accounting must survive. The blocks'
weights come from `weights.Weights`, which keeps the lane clean. `qwen4exp` has no plain
norms; `qwen4exp.py` keeps the lane clean through its hyper-connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import gguf
import numpy as np

from qwenrun.synthetic import qwen4exp
from qwenrun.synthetic.kquant import random_blocks
from qwenrun.synthetic.weights import Weights

Q4_K = gguf.GGMLQuantizationType.Q4_K

ARCHES = ("qwen3", "qwen3moe", "qwen3next", "qwen35moe", "qwen4exp")
HYBRID_ARCHES = ("qwen3next", "qwen35moe", "qwen4exp")

TEMPLATES_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = {
    "qwen3": "qwen3",
    "qwen3moe": "qwen3",
    "qwen3next": "qwen3",
    "qwen35moe": "qwen3.5",
    "qwen4exp": "qwen3.8",
}

# Qwen's special tokens, in the order they get ids after the byte tokens and merges.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
MERGES = ("Ġ t", "h e", "i n", "l l")
QWEN_VOCAB_SIZE = 151_936


@dataclass(frozen=True)
class Dims:
    """The numbers that fix every tensor shape (defaults: the verified tiny recipe)."""

    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 128
    n_expert: int = 8
    n_expert_used: int = 2
    expert_ff: int = 32
    shexp_ff: int = 32
    # Gated DeltaNet (hybrids): inner_size must equal ssm_state * ssm_v_heads.
    ssm_state: int = 16
    ssm_groups: int = 2
    ssm_v_heads: int = 4
    ssm_conv: int = 4
    full_attention_interval: int = 4


def template_text(name: str) -> str:
    """One of the bundled templates by name (`qwen3`, `qwen3.5`, `qwen3-coder`, `qwen3.8`)."""
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, which Qwen's byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    special_ids: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.tokens)


def build_vocab(size: int | None = None) -> Vocab:
    """256 byte tokens (id == byte), 4 merged tokens, Qwen's specials, then padding.

    Padding tokens are plain ASCII words no merge produces: they exist so the output layer
    and the sampler work on a vocabulary as wide as Qwen's (151,936), as in the real model.
    """
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(int(gguf.TokenType.NORMAL))
    special_ids = {}
    for tok in SPECIAL_TOKENS:
        special_ids[tok] = len(tokens)
        tokens.append(tok)
        is_tag = tok in ("<think>", "</think>")
        types.append(int(gguf.TokenType.USER_DEFINED if is_tag else gguf.TokenType.CONTROL))
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"vocab size {size} is smaller than the base vocab {len(tokens)}")
        tokens.extend(f"pad{i}" for i in range(size - len(tokens)))
        types.extend([int(gguf.TokenType.NORMAL)] * (size - len(types)))
    return Vocab(tokens, types, special_ids)


def _is_attention_layer(arch: str, layer: int, dims: Dims) -> bool:
    if arch not in HYBRID_ARCHES:
        return True
    return (layer + 1) % dims.full_attention_interval == 0


def add_tokenizer(writer: gguf.GGUFWriter, arch: str, vocab: Vocab, template: str) -> None:
    """Qwen's tokenizer keys: byte-level BPE, its specials, no BOS, `<|im_end|>` as EOS."""
    writer.add_tokenizer_model("gpt2")
    # llama.cpp knows "qwen2" and "qwen35" pre-tokenizers; "qwen3" is rejected. Qwen3.8
    # keeps Qwen3.5's tokenizer.
    writer.add_tokenizer_pre("qwen35" if arch in ("qwen35moe", "qwen4exp") else "qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(list(MERGES))
    writer.add_eos_token_id(vocab.special_ids["<|im_end|>"])
    writer.add_bos_token_id(vocab.special_ids["<|endoftext|>"])
    writer.add_pad_token_id(vocab.special_ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)


def _add_hparams(writer: gguf.GGUFWriter, arch: str, n_layer: int, dims: Dims, ctx: int) -> None:
    kv = writer.add_uint32
    kv(f"{arch}.context_length", ctx)
    kv(f"{arch}.embedding_length", dims.n_embd)
    kv(f"{arch}.block_count", n_layer)
    kv(f"{arch}.feed_forward_length", dims.n_ff)
    kv(f"{arch}.attention.head_count", dims.n_head)
    kv(f"{arch}.attention.head_count_kv", dims.n_head_kv)
    kv(f"{arch}.attention.key_length", dims.head_dim)
    kv(f"{arch}.attention.value_length", dims.head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    hybrid = arch in HYBRID_ARCHES
    writer.add_float32(f"{arch}.rope.freq_base", 1e7 if hybrid else 1e6)
    # The hybrids rotate only a quarter of each head (partial rotary).
    kv(f"{arch}.rope.dimension_count", dims.head_dim // 4 if hybrid else dims.head_dim)
    if arch == "qwen35moe":
        writer.add_array(f"{arch}.rope.dimension_sections", [2, 1, 1, 0])
    if arch != "qwen3":
        kv(f"{arch}.expert_count", dims.n_expert)
        kv(f"{arch}.expert_used_count", dims.n_expert_used)
        kv(f"{arch}.expert_feed_forward_length", dims.expert_ff)
    if hybrid:
        kv(f"{arch}.expert_shared_feed_forward_length", dims.shexp_ff)
        kv(f"{arch}.ssm.conv_kernel", dims.ssm_conv)
        kv(f"{arch}.ssm.state_size", dims.ssm_state)
        kv(f"{arch}.ssm.group_count", dims.ssm_groups)
        kv(f"{arch}.ssm.time_step_rank", dims.ssm_v_heads)
        kv(f"{arch}.ssm.inner_size", dims.ssm_state * dims.ssm_v_heads)
        kv(f"{arch}.full_attention_interval", dims.full_attention_interval)
        kv(f"{arch}.nextn_predict_layers", 0)


def _layer_tensors(arch: str, i: int, dims: Dims, w: Weights) -> list[tuple[str, np.ndarray]]:
    E, H, Hkv, D = dims.n_embd, dims.n_head, dims.n_head_kv, dims.head_dim
    X, Fx, Fs = dims.n_expert, dims.expert_ff, dims.shexp_ff
    p = f"blk.{i}."
    out: list[tuple[str, np.ndarray]] = [(p + "attn_norm.weight", w.norm(E, reads_residual=True))]
    hybrid = arch in HYBRID_ARCHES
    if _is_attention_layer(arch, i, dims):
        q_rows = 2 * H * D if hybrid else H * D  # hybrids gate attention: query + gate per head
        out += [
            (p + "attn_q.weight", w.matrix(q_rows, E)),
            (p + "attn_k.weight", w.matrix(Hkv * D, E)),
            (p + "attn_v.weight", w.matrix(Hkv * D, E)),
            (p + "attn_output.weight", w.matrix(E, H * D, lanes=(0,))),
            (p + "attn_q_norm.weight", w.norm(D)),
            (p + "attn_k_norm.weight", w.norm(D)),
        ]
    else:
        dS, G, Rv, dC = dims.ssm_state, dims.ssm_groups, dims.ssm_v_heads, dims.ssm_conv
        kd, vd = dS * G, dS * Rv
        cd = 2 * kd + vd
        out += [
            (p + "attn_qkv.weight", w.matrix(cd, E)),
            (p + "attn_gate.weight", w.matrix(vd, E)),
            # ssm_conv1d must be F32: the CPU conv kernel asserts float rows.
            (p + "ssm_conv1d.weight", w.rng.normal(0, 0.2, size=(cd, dC)).astype(np.float32)),
            (p + "ssm_dt.bias", np.zeros(Rv, dtype=np.float32)),
            # ssm_a holds -exp(A_log): negative, and it has no ".weight" suffix.
            (f"blk.{i}.ssm_a", -w.rng.uniform(0.5, 1.5, size=Rv).astype(np.float32)),
            (p + "ssm_norm.weight", w.norm(dS)),
            (p + "ssm_out.weight", w.matrix(E, vd, lanes=(0,))),
        ]
        if arch == "qwen35moe":
            out += [
                (p + "ssm_beta.weight", w.matrix(Rv, E)),
                (p + "ssm_alpha.weight", w.matrix(Rv, E)),
            ]
        else:
            out += [(p + "ssm_ba.weight", w.matrix(2 * Rv, E))]
    if hybrid:
        out.append((p + "post_attention_norm.weight", w.norm(E, reads_residual=True)))
    else:
        out.append((p + "ffn_norm.weight", w.norm(E, reads_residual=True)))
    if arch == "qwen3":
        out += [
            (p + "ffn_gate.weight", w.matrix(dims.n_ff, E)),
            (p + "ffn_up.weight", w.matrix(dims.n_ff, E)),
            (p + "ffn_down.weight", w.matrix(E, dims.n_ff, lanes=(0,))),
        ]
        return out
    out += [
        (p + "ffn_gate_inp.weight", w.matrix(X, E)),
        (p + "ffn_gate_exps.weight", w.matrix(X, Fx, E)),
        (p + "ffn_up_exps.weight", w.matrix(X, Fx, E)),
        (p + "ffn_down_exps.weight", w.matrix(X, E, Fx, lanes=(0,))),
    ]
    if hybrid:
        out += [
            (p + "ffn_gate_inp_shexp.weight", w.norm(E) * 0.02),
            (p + "ffn_gate_shexp.weight", w.matrix(Fs, E)),
            (p + "ffn_up_shexp.weight", w.matrix(Fs, E)),
            (p + "ffn_down_shexp.weight", w.matrix(E, Fs, lanes=(0,))),
        ]
    return out


def _global_tensors(
    vocab: Vocab, n_embd: int, w: Weights, steer: int, eos_bias: float
) -> list[tuple[str, np.ndarray]]:
    E, V = n_embd, vocab.size
    embd = w.rng.normal(0.0, 0.02, size=(V, E)).astype(np.float32)
    output = w.rng.normal(0.0, 0.02, size=(V, E)).astype(np.float32)
    if steer:
        embd[:, 0] = 0.2  # the constant bias lane
        output[:, 0] = 0.0
        output[0x80:0x100, 0] = -10.0  # UTF-8 continuation and lead bytes
        if steer >= 2:
            for tid in vocab.special_ids.values():
                output[tid, 0] = -10.0
        # A positive bias makes `<|im_end|>` the overwhelming choice: a model that stops.
        output[vocab.special_ids["<|im_end|>"], 0] += eos_bias
    return [
        ("token_embd.weight", embd.astype(w.dtype)),
        ("output_norm.weight", np.ones(E, dtype=np.float32)),
        ("output.weight", output.astype(w.dtype)),
    ]


def write_model(
    dest_dir: str | Path,
    arch: str = "qwen3moe",
    *,
    n_layer: int = 4,
    vocab_size: int | None = None,
    steer: int = 1,
    dtype: str = "f32",
    split: int = 1,
    name: str | None = None,
    dims: Dims | qwen4exp.Qwen4ExpDims | None = None,
    context_length: int = 32768,
    chat_template: str | None = None,
    seed: int = 0,
    eos_bias: float = 0.0,
) -> Path:
    """Write a tiny model and return the path of its (first) file.

    `split=N` writes N shards named `<name>-0000k-of-0000N.gguf`, llama.cpp's split layout.
    `chat_template` is a bundled template name or the template text itself.
    `eos_bias` (with steer >= 1) raises `<|im_end|>`'s logit lane: 10 makes every answer
    end at once, for tests of stopping at end-of-generation.
    `dtype="q4_k"` writes every matrix whose rows are whole 256-element blocks as random
    Q4_K blocks (`kquant`), the rest in f32: a K-quant model, the kind whose CPU kernels
    (repacked, AMX) differ from the float ones. Use dims with n_embd a multiple of 256.
    Steering needs float weights, so a q4_k model is unsteered (its text is random bytes).
    `qwen4exp` takes its own `qwen4exp.Qwen4ExpDims` (the n-gram table's rows and type, QSA
    on or off, ...); use ple_row=64 there for a K-quant model.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    q4_dims: qwen4exp.Qwen4ExpDims | None = None
    if arch == "qwen4exp":
        if not isinstance(dims, qwen4exp.Qwen4ExpDims | None):
            raise ValueError("qwen4exp's dims are a qwen4exp.Qwen4ExpDims")
        q4_dims = dims or qwen4exp.Qwen4ExpDims()
    elif isinstance(dims, qwen4exp.Qwen4ExpDims):
        raise ValueError(f"{arch}'s dims are a tiny_gguf.Dims")
    base = dims if isinstance(dims, Dims) else Dims()
    vocab = build_vocab(vocab_size)
    template = chat_template or DEFAULT_TEMPLATE[arch]
    if "{" not in template:
        template = template_text(template)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    stem = name or f"tiny-{arch}-{n_layer}l-v{vocab.size}-s{steer}-{dtype}" + (
        f"-eos{eos_bias:g}" if eos_bias else ""
    )
    path = dest / f"{stem}.gguf"

    quantize = dtype == "q4_k"
    # q4_k: the matrices are drawn as f32 and then replaced by random blocks.
    np_dtype = np.float16 if dtype == "f16" else np.float32
    w = Weights(np.random.default_rng(seed), np_dtype, steer)
    tensors: list[tuple[str, np.ndarray | qwen4exp.NgramTable]] = []
    if q4_dims is not None:
        # No output_norm: the final hyper-connection mixer is the output norm.
        embd = _global_tensors(vocab, q4_dims.n_embd, w, steer, eos_bias)
        tensors += [(t, a) for t, a in embd if t != "output_norm.weight"]
        tensors += qwen4exp.tensors(n_layer, q4_dims, w, quantized=quantize, seed=seed)
    else:
        tensors += _global_tensors(vocab, base.n_embd, w, steer, eos_bias)
        for i in range(n_layer):
            tensors += _layer_tensors(arch, i, base, w)

    per_shard = -(-len(tensors) // split) if split > 1 else 0
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=per_shard)
    writer.add_name(stem)
    if q4_dims is not None:
        eos = vocab.special_ids["<|endoftext|>"]  # Qwen's eos_token_id, which the hash resets on
        qwen4exp.add_hparams(writer, n_layer, q4_dims, context_length, eos)
    else:
        _add_hparams(writer, arch, n_layer, base, context_length)
    add_tokenizer(writer, arch, vocab, template)
    bitgen = np.random.PCG64(seed)
    for tname, arr in tensors:
        if isinstance(arr, qwen4exp.NgramTable):
            # Streamed: the writer reads only shape, dtype and nbytes, then calls tofile.
            writer.add_tensor(tname, cast(np.ndarray, arr), raw_dtype=arr.raw_dtype)
        elif quantize and arr.ndim >= 2 and arr.shape[-1] % 256 == 0 and "norm" not in tname:
            # (qwen4exp's grouped-norm gammas are 2-D; norms stay float.)
            blocks = random_blocks(Q4_K, arr.size // 256, bitgen)
            byte_shape = (*arr.shape[:-1], arr.shape[-1] // 256 * blocks.shape[1])
            writer.add_tensor(tname, blocks.reshape(byte_shape), raw_dtype=Q4_K)
        else:
            writer.add_tensor(tname, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split > 1:
        return dest / f"{stem}-00001-of-{split:05d}.gguf"
    return path
