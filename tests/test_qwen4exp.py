"""Tiny `qwen4exp` (Qwen3.8-Flash-Next) GGUFs: the file written, the real llama.cpp running it
through qwenrun's engine, the steering guarantees, and the Qwen3.8-style chat template."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import pytest

from qwenrun import errors
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig, Placement
from qwenrun.engine.values import SamplingParams
from qwenrun.synthetic.qwen4exp import Qwen4ExpDims
from qwenrun.synthetic.tiny_gguf import Dims, build_vocab, template_text, write_model
from qwenrun.template import ChatTemplate, detect_thinking_kind

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
A = "qwen4exp"
PROMPT = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
LONG_PROMPT = (
    "<|im_start|>user\n"
    + "the quick brown fox jumps over the lazy dog. " * 8
    + "<|im_end|>\n<|im_start|>assistant\n"
)
GREEDY = SamplingParams(temperature=0.0)
QWEN38_VOCAB = 248_320
SPECIAL_IDS = set(build_vocab().special_ids.values())


def hot(seed: int) -> SamplingParams:
    """Raw sampling, hotter than any preset: nothing but the steering keeps tokens out."""
    return SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed)


def load(path: Path, **kw: Any) -> Engine:
    return Engine.load(path, LoadConfig(**{"n_ctx": 1024, "prompt_cache": 0, **kw}))


def greedy_tokens(path: Path, prompt: str = PROMPT, n: int = 24, **kw: Any) -> list[int]:
    with load(path, **kw) as eng:
        gen = eng.generate(eng.tokenize(prompt), GREEDY, max_tokens=n)
        gen.text()
        return gen.tokens


def reader_of(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def tensors_by_name(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


# ---- the file


def test_tensor_set_has_hyper_connections_and_no_plain_norms(tiny_models):
    by = tensors_by_name(reader_of(tiny_models(A)))
    names = set(by)
    plain_norms = ("output_norm", "attn_norm", "post_attention_norm", "ffn_norm")
    assert not [n for n in names if n.split(".")[-2] in plain_norms]
    # Layers 0-2 Gated DeltaNet, 3 full attention; the PLE module sits on linear layer 1.
    assert {n.split(".")[1] for n in names if n.endswith("attn_k.weight")} == {"3"}
    assert {n.split(".")[1] for n in names if n.endswith("ssm_out.weight")} == {"0", "1", "2"}
    assert {n.split(".")[1] for n in names if ".ple_" in n} == {"1"}
    for i in range(4):
        for part in ("norm", "down", "up", "inject"):
            assert f"blk.{i}.hc_attn_{part}.weight" in names
            assert f"blk.{i}.hc_ffn_{part}.weight" in names
    assert "blk.3.indexer.k_proj.weight" in names and "blk.3.indexer.q_norm.weight" in names
    # 2 embedding/output + 3 final HC + the table; 3 GDN layers of 8 HC + 9 GDN + 8 MoE,
    # one attention layer of 8 + 10 (attention and indexer) + 8, and 6 PLE tensors.
    assert len(names) == 6 + 3 * 25 + 26 + 6
    assert by["output_hc_norm.weight"].shape.tolist() == [64, 4]
    assert by["blk.3.attn_q.weight"].shape.tolist() == [64, 2 * 4 * 32]
    assert by["blk.1.ple_key.weight"].shape.tolist() == [64, 4 * 64]
    assert by["blk.1.ple_conv1d.weight"].shape.tolist() == [4, 4 * 64]


def test_ple_keys_are_uint64_and_n_embd_is_row_times_heads(tiny_models):
    dims = Qwen4ExpDims(ple_row=24, heads_per_ngram=3, ple_rows=6000)
    reader = reader_of(tiny_models(A, dims=dims))
    for key in ("layer_multipliers", "head_offsets", "head_vocab_sizes"):
        assert reader.fields[f"{A}.ple.{key}"].types == [V.ARRAY, V.UINT64], key
    heads = (3 - 1) * 3
    assert field(reader, f"{A}.embedding_length") == 24 * heads
    assert field(reader, f"{A}.embedding_length_per_layer_input") == 24
    assert field(reader, f"{A}.ple.layers") == [1]
    offsets = field(reader, f"{A}.ple.head_offsets")
    sizes = field(reader, f"{A}.ple.head_vocab_sizes")
    assert isinstance(offsets, list) and isinstance(sizes, list) and len(offsets) == heads
    table = tensors_by_name(reader)["per_layer_token_embd.weight"]
    assert table.shape.tolist() == [24, 6000]
    # The heads' ranges tile the table: every row is reachable, none lies beyond it.
    assert max(o + s for o, s in zip(offsets, sizes, strict=True)) <= 6000
    assert sum(sizes) > 6000 - heads


def test_compress_ratios_say_whether_attention_is_sparse(tiny_models):
    qsa = reader_of(tiny_models(A))
    assert field(qsa, f"{A}.attention.compress_ratios") == [4, 4, 4, 4]
    dense = reader_of(tiny_models(A, dims=Qwen4ExpDims(compress_ratio=0)))
    assert f"{A}.attention.compress_ratios" not in dense.fields
    # The indexer's tensors are required either way.
    assert "blk.3.indexer.q_proj.weight" in tensors_by_name(dense)


def test_k_quant_model_keeps_norms_float_and_the_table_at_q8_0(tiny_models):
    by = tensors_by_name(reader_of(tiny_models(A, dtype="q4_k", dims=Qwen4ExpDims(ple_row=64))))
    assert by["blk.0.attn_qkv.weight"].tensor_type == Q.Q4_K
    assert by["blk.3.indexer.q_proj.weight"].tensor_type == Q.Q4_K
    assert by["blk.0.hc_attn_down.weight"].tensor_type == Q.Q4_K
    for name in ("blk.0.hc_attn_norm.weight", "output_hc_norm.weight", "blk.1.ple_norm_key.weight"):
        assert by[name].tensor_type == Q.F32, name
    assert by["per_layer_token_embd.weight"].tensor_type == Q.Q8_0


def test_default_template_is_the_qwen38_one(tiny_models):
    reader = reader_of(tiny_models(A))
    assert field(reader, "tokenizer.chat_template") == template_text("qwen3.8")
    assert field(reader, "tokenizer.ggml.pre") == "qwen35"


def test_shapes_llama_cpp_would_reject_are_refused(tmp_path):
    with pytest.raises(ValueError, match="full-attention layer"):
        write_model(tmp_path, A, n_layer=3)
    with pytest.raises(ValueError, match="linear"):
        write_model(tmp_path, A, dims=Qwen4ExpDims(ple_layer=3))
    with pytest.raises(ValueError, match="Qwen4ExpDims"):
        write_model(tmp_path, A, dims=Dims())
    with pytest.raises(ValueError, match=r"tiny_gguf\.Dims"):
        write_model(tmp_path, "qwen35moe", dims=Qwen4ExpDims())
    with pytest.raises(ValueError, match="multiple of 32"):
        write_model(tmp_path, A, dtype="q4_k")  # ple_row 16: no whole q8_0 blocks
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_large_table_is_streamed_to_the_file(tmp_path):
    rows = 1 << 20  # 64 MiB of f32 rows
    tracemalloc.start()
    try:
        path = write_model(tmp_path, A, dims=Qwen4ExpDims(ple_rows=rows))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    table = tensors_by_name(reader_of(path))["per_layer_token_embd.weight"]
    assert table.shape.tolist() == [16, rows]
    assert int(table.n_bytes) == rows * 16 * 4
    assert path.stat().st_size > 64 << 20
    assert peak < 40 << 20  # never the whole table at once


# ---- the Qwen3.8-style template


def render(extra: dict[str, object] | None = None, *, thinking: bool = True, msgs=None) -> str:
    messages = msgs or [{"role": "user", "content": "hi"}]
    return ChatTemplate(template_text("qwen3.8")).render(
        messages, enable_thinking=thinking, extra=extra
    )


@pytest.mark.slow
def test_template_thinks_by_default_and_can_turn_it_off():
    assert detect_thinking_kind(ChatTemplate(template_text("qwen3.8"))) == "hybrid"
    assert render().endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert render(thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.slow
def test_reasoning_effort_levels_and_a_bad_one():
    default, xhigh = render(), render({"reasoning_effort": "xhigh"})
    medium, low = render({"reasoning_effort": "medium"}), render({"reasoning_effort": "low"})
    assert default == xhigh
    # xhigh and low open a system turn with their paragraph; medium adds nothing.
    assert xhigh.startswith("<|im_start|>system\nReasoning effort: extra high.")
    assert low.startswith("<|im_start|>system\nReasoning effort: low.")
    assert medium.startswith("<|im_start|>user\nhi")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with_system = render({"reasoning_effort": "low"}, msgs=system)
    assert with_system.startswith("<|im_start|>system\nReasoning effort: low.")
    assert "confident.\n\nBe brief.<|im_end|>\n<|im_start|>user\nhi" in with_system
    for bad in ("high", "none", "max"):
        with pytest.raises(errors.InvalidModelError, match="reasoning_effort must be"):
            render({"reasoning_effort": bad})


def test_past_thinking_is_preserved_unless_turned_off():
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A1 </think> kept", "reasoning_content": "R1"},
        {"role": "user", "content": "two"},
    ]
    kept = render({"reasoning_effort": "medium"}, msgs=msgs)
    assert "<|im_start|>assistant\n<think>\nR1\n</think>\n\nA1 </think> kept<|im_end|>" in kept
    dropped = render({"reasoning_effort": "medium", "preserve_thinking": False}, msgs=msgs)
    assert "<|im_start|>assistant\nA1 </think> kept<|im_end|>" in dropped
    assert "R1" not in dropped


# ---- the real llama.cpp, through qwenrun's engine


@pytest.mark.slow
def test_engine_loads_and_decodes_with_the_indexer_cache(tiny_models):
    with load(tiny_models(A), n_ctx=4096) as eng:
        assert eng.meta.arch == A and eng.meta.is_recurrent
        assert any("creating indexer KV cache" in ln for ln in eng.log_lines)
        # One attention layer: K and V (2 KV heads x 32) plus the indexer's one key of 32,
        # f16: 4096 x (128 + 32) x 2 bytes, logged as two KV buffers (1.00 + 0.25 MiB).
        assert eng.placement.total("kv") == 4096 * (2 * 64 + 32) * 2
        assert eng.placement.total("rs") > 0 and eng.placement.total("model") > 0
        gen = eng.generate(eng.tokenize(PROMPT), GREEDY, max_tokens=16)
        gen.text()
        assert gen.n_generated >= 1 and gen.stats is not None


@pytest.mark.slow
def test_greedy_output_is_deterministic_and_the_same_in_small_ubatches(tiny_models):
    path = tiny_models(A, steer=2, n_layer=8)
    first = greedy_tokens(path, LONG_PROMPT)
    assert len(first) == 24
    assert greedy_tokens(path, LONG_PROMPT) == first
    # A prompt cut into ubatches of 7: the n-gram hash reads its predecessors from the cache
    # and the PLE convolution its history from the recurrent state, across ubatches.
    assert greedy_tokens(path, LONG_PROMPT, n_batch=7, n_ubatch=7) == first


@pytest.mark.slow
def test_qsa_selects_blocks_only_when_the_budget_is_smaller_than_the_context(tiny_models):
    dense = greedy_tokens(tiny_models(A, steer=2, dims=Qwen4ExpDims(compress_ratio=0)), LONG_PROMPT)
    wide = greedy_tokens(tiny_models(A, steer=2), LONG_PROMPT)
    sparse = greedy_tokens(tiny_models(A, steer=2, dims=Qwen4ExpDims(idx_top_k=8)), LONG_PROMPT)
    assert wide == dense  # a budget of 2048 tokens keeps every cell of a 348-token prompt
    assert sparse != dense


@pytest.mark.slow
def test_steer1_completions_are_ascii_and_honour_max_tokens(tiny_models):
    with load(tiny_models(A, steer=1)) as eng:
        for seed in range(4):
            gen = eng.generate(eng.tokenize(PROMPT), hot(seed), max_tokens=48)
            text = gen.text()
            assert gen.n_generated <= 48
            assert not [t for t in gen.tokens if 0x80 <= t < 0x100]
            assert text.isascii()
            eng.reset()
    # The same sampling on the unsteered model does emit those bytes: steering is the cause.
    with load(tiny_models(A, steer=0)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), hot(0), max_tokens=48)
        gen.text()
        assert [t for t in gen.tokens if 0x80 <= t < 0x100]


@pytest.mark.slow
def test_steer2_completions_always_run_to_max_tokens(tiny_models):
    # Qwen3.8's vocabulary width: the sampler sees 248,320 candidates, as with the real model.
    with load(tiny_models(A, steer=2, vocab_size=QWEN38_VOCAB, n_layer=8)) as eng:
        assert eng.meta.n_vocab == QWEN38_VOCAB
        for seed in range(2):
            gen = eng.generate(eng.tokenize(PROMPT), hot(seed), max_tokens=32)
            assert gen.text().isascii()
            assert gen.finish_reason == "length" and gen.n_generated == 32
            assert not SPECIAL_IDS & set(gen.tokens)
            eng.reset()


@pytest.mark.slow
def test_eos_bias_ends_every_answer_at_once(tiny_models):
    with load(tiny_models(A, steer=1, eos_bias=10.0)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), hot(1), max_tokens=20)
        assert gen.text() == ""
        assert gen.finish_reason == "stop" and len(gen.tokens) == 1


@pytest.mark.slow
def test_split_model_loads_all_shards(tiny_models):
    path = tiny_models(A, split=3, steer=2)
    assert path.name.endswith("-00001-of-00003.gguf")
    with load(path) as eng, load(tiny_models(A, steer=2)) as whole:
        assert len([b for b in eng.placement.buffers if b.kind == "model"]) == 3
        # The same weights as the single file (to the log's 0.01 MiB per buffer).
        assert abs(eng.placement.total("model") - whole.placement.total("model")) < 0.03 * 2**20
        gen = eng.generate(eng.tokenize(PROMPT), GREEDY, max_tokens=8)
        gen.text()
        assert gen.n_generated == 8
    assert greedy_tokens(path, n=8) == greedy_tokens(tiny_models(A, steer=2), n=8)


@pytest.mark.slow
def test_k_quant_model_loads_and_decodes(tiny_models):
    path = tiny_models(A, dtype="q4_k", dims=Qwen4ExpDims(ple_row=64))
    # Plain kernels: on some CPUs the repacked AMX ones die by SIGILL (see engine/crash.py,
    # whose check `launch` runs before a load; Engine.load alone does not).
    with load(path, extra_bufts=False) as eng:
        # Random Q4_K blocks say nothing: never stop early, just decode.
        ban = SamplingParams(temperature=0.0, ban_eog=True)
        gen = eng.generate(eng.tokenize(PROMPT), ban, max_tokens=12)
        gen.text()
        assert gen.n_generated == 12


@pytest.mark.slow
def test_f16_model_has_an_f16_table_and_decodes(tiny_models):
    path = tiny_models(A, dtype="f16", steer=2)
    by = tensors_by_name(reader_of(path))
    assert by["per_layer_token_embd.weight"].tensor_type == Q.F16
    assert by["blk.0.hc_ffn_up.weight"].tensor_type == Q.F16
    assert by["blk.1.ple_norm_query.weight"].tensor_type == Q.F32
    # Plain kernels, as for the K-quant model: f16 weights may go to the AMX buffer type.
    with load(path, extra_bufts=False) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), hot(2), max_tokens=16)
        assert gen.text().isascii() and gen.n_generated == 16


@pytest.mark.slow
def test_cpu_moe_moves_the_routed_experts_and_not_the_table(tiny_models):
    with load(tiny_models(A), placement=Placement(cpu_moe_all=True)) as eng:
        names = {t for t, _ in eng.placement.overridden_tensors}
        assert names == {
            f"blk.{i}.ffn_{k}_exps.weight" for i in range(4) for k in ("gate", "up", "down")
        }
        assert eng.placement.cpu_moe_layers == (0, 1, 2, 3)
