"""benchmarks/synthetic_model.py: the full-size synthetic Qwen GGUFs the GPU benchmarks use.

The plan (names, ggml shapes, types, bytes) is checked against catalog.md's numbers for
Qwen3-30B-A3B and Qwen3.5-35B-A3B at Q4_K_M; the blocks against gguf's own dequantizers;
a written file (one block with the full per-layer shapes) against GGUFReader, and then
loaded and run by the real llama.cpp. Those files are K-quants: every load here goes by
qwenrun's own CPU kernel check (the `cpu_kernels` fixture), because on a CPU whose AMX
kernels die by SIGILL a load with the extra buffer types on would end the whole test run.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from qwenrun.synthetic import kquant

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location(
        "synthetic_model", ROOT / "benchmarks" / "synthetic_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_model"] = module
    spec.loader.exec_module(module)
    return module


sm = _load_script()

# catalog.md §3.5: one Qwen3-30B-A3B layer's routed experts at Q4_K_M, down in Q4_K / Q6_K.
Q30_LAYER_DOWN_Q4K = 339_738_624
Q30_LAYER_DOWN_Q6K = 391_643_136
Q35_LAYER_DOWN_Q4K = 452_984_832
Q35_LAYER_DOWN_Q6K = 522_190_848


def _by_name(tensors: list) -> dict:
    return {t.name: t for t in tensors}


def _expert_bytes_by_layer(tensors: list) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if "_exps." in t.name:
            layer = int(t.name.split(".")[1])
            out[layer] = out.get(layer, 0) + t.n_bytes
    return out


# ---------------------------------------------------------------------------------------
# The plan, full size, no file


def test_use_more_bits_matches_llama_quant_counts():
    assert sum(sm.use_more_bits(i, 48) for i in range(48)) == 24
    assert sum(sm.use_more_bits(i, 40) for i in range(40)) == 20
    # n/8 = 6 and 7n/8 = 42 for 48 layers: the ends, then every third layer from 8.
    picked = [i for i in range(48) if sm.use_more_bits(i, 48)]
    assert picked[:8] == [0, 1, 2, 3, 4, 5, 8, 11]
    assert picked[-7:] == [41, 42, 43, 44, 45, 46, 47]


def test_qwen3_30b_plan_matches_the_real_q4_k_m():
    shape = sm.resolve_shape("qwen3-30b-a3b")
    tensors = sm.plan_tensors(shape)
    by = _by_name(tensors)
    assert len(tensors) == 3 + 48 * 12  # the real file's 579 tensors

    assert by["token_embd.weight"].ne == (2048, 151_936)
    assert by["token_embd.weight"].ggml_type == Q.Q4_K
    assert by["output.weight"].ggml_type == Q.Q6_K
    assert by["output_norm.weight"].ggml_type == Q.F32
    for i in (0, 6, 47):
        p = f"blk.{i}."
        assert by[p + "attn_q.weight"].ne == (2048, 32 * 128)
        assert by[p + "attn_k.weight"].ne == (2048, 4 * 128)
        assert by[p + "attn_v.weight"].ne == (2048, 4 * 128)
        assert by[p + "attn_output.weight"].ne == (32 * 128, 2048)
        assert by[p + "attn_q_norm.weight"].ne == (128,)
        assert by[p + "ffn_gate_inp.weight"].ne == (2048, 128)
        assert by[p + "ffn_gate_inp.weight"].ggml_type == Q.F32
        assert by[p + "ffn_gate_exps.weight"].ne == (2048, 768, 128)
        assert by[p + "ffn_up_exps.weight"].ne == (2048, 768, 128)
        assert by[p + "ffn_down_exps.weight"].ne == (768, 2048, 128)
        assert by[p + "ffn_gate_exps.weight"].ggml_type == Q.Q4_K
    # use_more_bits: layer 0 gets Q6_K down and attn_v, layer 6 does not.
    assert by["blk.0.ffn_down_exps.weight"].ggml_type == Q.Q6_K
    assert by["blk.6.ffn_down_exps.weight"].ggml_type == Q.Q4_K
    assert by["blk.0.attn_v.weight"].ggml_type == Q.Q6_K
    assert by["blk.6.attn_v.weight"].ggml_type == Q.Q4_K

    per_layer = _expert_bytes_by_layer(tensors)
    assert sorted(set(per_layer.values())) == [Q30_LAYER_DOWN_Q4K, Q30_LAYER_DOWN_Q6K]
    assert list(per_layer.values()).count(Q30_LAYER_DOWN_Q6K) == 24
    # Hugging Face lists Qwen3-30B-A3B Q4_K_M files at 17.28 GiB (catalog.md §2.2).
    total = sum(t.n_bytes for t in tensors)
    assert abs(total / 2**30 - 17.28) < 0.01


def test_qwen35_35b_plan_has_hybrid_layers_and_shared_experts():
    shape = sm.resolve_shape("qwen3.5-35b-a3b")
    tensors = sm.plan_tensors(shape)
    by = _by_name(tensors)
    # 10 attention layers of 16 tensors, 30 Gated-DeltaNet layers of 19, 3 globals.
    assert len(tensors) == 3 + 10 * 16 + 30 * 19
    assert by["token_embd.weight"].ne == (2048, 248_320)
    attention = sorted(
        int(t.name.split(".")[1]) for t in tensors if t.name.endswith("attn_k.weight")
    )
    assert attention == list(range(3, 40, 4))
    assert by["blk.3.attn_q.weight"].ne == (2048, 2 * 16 * 256)  # query + gate per head
    assert by["blk.3.attn_output.weight"].ne == (16 * 256, 2048)
    assert by["blk.0.attn_qkv.weight"].ne == (2048, 2 * 128 * 16 + 128 * 32)
    assert by["blk.0.attn_gate.weight"].ne == (2048, 128 * 32)
    assert by["blk.0.ssm_conv1d.weight"].ne == (4, 8192)
    assert by["blk.0.ssm_conv1d.weight"].ggml_type == Q.F32
    assert by["blk.0.ssm_a"].ne == (32,)
    assert by["blk.0.ssm_beta.weight"].ne == (2048, 32)
    assert by["blk.0.ssm_out.weight"].ne == (128 * 32, 2048)
    assert by["blk.0.ffn_gate_exps.weight"].ne == (2048, 512, 256)
    assert by["blk.0.ffn_gate_inp_shexp.weight"].ne == (2048,)
    assert by["blk.0.ffn_down_shexp.weight"].ne == (512, 2048)
    assert by["blk.0.ffn_down_shexp.weight"].ggml_type == Q.Q6_K

    per_layer = _expert_bytes_by_layer(tensors)
    assert sorted(set(per_layer.values())) == [Q35_LAYER_DOWN_Q4K, Q35_LAYER_DOWN_Q6K]
    assert list(per_layer.values()).count(Q35_LAYER_DOWN_Q6K) == 20
    # catalog.md: routed experts of a Q4_K_M-style 35B are 18.2 GiB.
    assert abs(sum(per_layer.values()) / 2**30 - 18.2) < 0.05


def test_cut_down_shapes_are_validated():
    with pytest.raises(ValueError, match="layers >= 4"):
        sm.resolve_shape("qwen3.5-35b-a3b", layers=2)
    with pytest.raises(ValueError, match="unknown model"):
        sm.resolve_shape("qwen9")
    with pytest.raises(ValueError, match="at least 1"):
        sm.resolve_shape("qwen3-30b-a3b", layers=0)
    small = sm.resolve_shape("qwen3-30b-a3b", layers=2, experts=4)
    assert (small.n_layer, small.n_expert, small.n_expert_used) == (2, 4, 4)


# ---------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0])
def test_random_blocks_dequantize_to_small_zero_mean_weights(qtype):
    blocks = kquant.random_blocks(qtype, 512, np.random.PCG64(3))
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert blocks.shape == (512, block_bytes)
    w = dequantize(blocks, qtype)
    assert w.size == 512 * block_elems
    assert np.isfinite(w).all()
    assert abs(float(w.mean())) < 2e-3
    assert 0.012 < float(w.std()) < 0.024
    assert float(np.abs(w).max()) < 0.1
    # Random, not constant: the quants differ from block to block.
    assert len(np.unique(w)) > 8


def test_blocks_differ_between_chunks_and_repeat_with_the_seed():
    a = kquant.random_blocks(Q.Q4_K, 16, np.random.PCG64(7))
    b = kquant.random_blocks(Q.Q4_K, 16, np.random.PCG64(7))
    gen = np.random.PCG64(7)
    c1, c2 = kquant.random_blocks(Q.Q4_K, 8, gen), kquant.random_blocks(Q.Q4_K, 8, gen)
    assert np.array_equal(a, b)
    assert not np.array_equal(c1[:, 16:], c2[:, 16:])


# ---------------------------------------------------------------------------------------
# A written file: one block with Qwen3-30B-A3B's full per-layer shapes


@pytest.fixture(scope="module")
def one_layer_30b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, int]:
    # The full vocabulary would add ~430 MB of embedding/output; 1024 tokens keep the
    # file at ~400 MB while every per-layer shape stays the real one.
    shape = sm.resolve_shape("qwen3-30b-a3b", layers=1, vocab_size=1024)
    path = tmp_path_factory.mktemp("synth") / "q30-1l.gguf"
    tracemalloc.start()
    try:
        sm.write_model(path, shape, seed=1, chunk_bytes=4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return path, shape, peak


@pytest.mark.slow
def test_written_file_reads_back_as_planned(one_layer_30b):
    path, shape, peak = one_layer_30b
    plan = sm.plan_tensors(shape)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == [t.name for t in plan]
    for got, want in zip(reader.tensors, plan, strict=True):
        assert got.tensor_type == want.ggml_type, got.name
        assert tuple(int(x) for x in got.shape) == want.ne, got.name
        assert int(got.n_bytes) == want.n_bytes, got.name

    def field(key: str) -> object:
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "qwen3moe"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert field("qwen3moe.block_count") == 1
    assert field("qwen3moe.expert_count") == 128
    assert field("qwen3moe.expert_used_count") == 8
    assert field("qwen3moe.expert_feed_forward_length") == 768
    assert field("qwen3moe.attention.head_count_kv") == 4
    tokens = field("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == 1024

    # Every tensor's data ends inside the file, and the file ends with the last tensor.
    last = reader.tensors[-1]
    end = int(last.data_offset) + int(last.n_bytes)
    assert path.stat().st_size - end < reader.alignment

    # Streamed: the writer never held a tensor whole (the largest is 165 MB).
    largest = max(t.n_bytes for t in plan)
    assert largest > 100 << 20
    assert peak < 32 << 20


@pytest.mark.slow
def test_written_experts_dequantize_across_chunk_boundaries(one_layer_30b):
    path, _, _ = one_layer_30b
    reader = gguf.GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert down.tensor_type == Q.Q6_K
    # Expert 37's rows sit well past the first 4 MiB chunk.
    w = dequantize(np.asarray(down.data[37]), Q.Q6_K)
    assert w.shape == (2048, 768)
    assert np.isfinite(w).all()
    assert 0.012 < float(w.std()) < 0.024


def _logits(path: Path, text: bytes, steps: int, *, extra_bufts: bool) -> tuple[np.ndarray, int]:
    """llama.cpp's logits for every token of `text`, then for `steps` greedy tokens after it,
    and the prompt's length. Through the C API because llama-cpp-python's `Llama` cannot turn
    the extra CPU buffer types off."""
    import llama_cpp as lc

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    mparams.use_extra_bufts = extra_bufts
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    assert model, "llama.cpp did not load the file"
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = lc.llama_init_from_model(model, cparams)
    try:
        vocab = lc.llama_model_get_vocab(model)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        ids = (lc.llama_token * 64)()
        n = lc.llama_tokenize(vocab, text, len(text), ids, 64, False, True)
        assert 0 < n < 64
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = ids[i], i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = n
            assert lc.llama_decode(ctx, batch) == 0
        finally:
            lc.llama_batch_free(batch)

        def row(i: int) -> np.ndarray:
            return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()

        rows = [row(i) for i in range(n)]
        one = (lc.llama_token * 1)()
        for _ in range(steps):
            one[0] = int(np.argmax(rows[-1]))
            assert lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1)) == 0
            rows.append(row(-1))
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return np.stack(rows), n


@pytest.mark.slow
def test_llama_cpp_runs_the_full_shape_layer_with_finite_logits(one_layer_30b, cpu_kernels):
    path, _, _ = one_layer_30b
    text = b"<|im_start|>user\nhello there<|im_end|>"
    logits, n = _logits(path, text, 4, extra_bufts=cpu_kernels.extra_bufts)
    assert logits.shape == (n + 4, 1024)
    assert np.isfinite(logits).all()
    # Real, varied outputs: not all zero, not one constant row.
    assert float(logits.std(axis=1).min()) > 0.1
    assert float(np.abs(logits).max()) < 100


@pytest.mark.slow
def test_qwenrun_engine_places_the_real_expert_tensors_on_cpu(one_layer_30b, cpu_kernels):
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig, Placement
    from qwenrun.engine.values import SamplingParams

    path, _, _ = one_layer_30b
    config = LoadConfig(
        n_ctx=128,
        n_batch=64,
        n_threads=2,
        placement=Placement(cpu_moe_all=True),
        extra_bufts=cpu_kernels.extra_bufts,
    )
    with Engine.load(path, config) as engine:
        overridden = {name for name, _buft in engine.placement.overridden_tensors}
        gen = engine.generate(engine.tokenize("hello"), SamplingParams(seed=1), max_tokens=4)
        text = "".join(gen)
    assert overridden == {f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}
    assert gen.n_generated >= 1
    assert text != ""
    assert math.isfinite(gen.stats.decode_tok_s)


@pytest.mark.slow
def test_qwen35_hybrid_file_loads_and_runs(tmp_path, cpu_kernels):
    # Four blocks (3 Gated DeltaNet + 1 attention) with the real per-layer shapes except
    # the expert count, which is cut to 8 to keep the file at ~150 MB.
    shape = sm.resolve_shape("qwen3.5-35b-a3b", layers=4, vocab_size=1024, experts=8)
    path = sm.write_model(tmp_path / "q35.gguf", shape, seed=2)
    text = b"<|im_start|>user\nhi<|im_end|>"
    logits, _ = _logits(path, text, 0, extra_bufts=cpu_kernels.extra_bufts)
    assert np.isfinite(logits).all()
    assert float(logits.std(axis=1).min()) > 0.1


def test_plan_command_prints_a_summary_and_writes_nothing(tmp_path, capsys):
    assert sm.main(["--plan", "--model", "qwen3-30b-a3b"]) == 0
    err = capsys.readouterr().err
    assert "579 tensors" in err
    assert "17.28 GiB" in err
    assert list(tmp_path.iterdir()) == []
