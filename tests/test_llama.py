"""The engine on real llama.cpp, with generated tiny Qwen models."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from qwenrun import errors
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig, Placement
from qwenrun.engine.values import SamplingParams

# Every test here loads a model into llama.cpp.
pytestmark = pytest.mark.slow

EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def load(path: Path, placement: Placement | None = None, n_ctx: int = 512) -> Engine:
    return Engine.load(path, LoadConfig(placement=placement or Placement(), n_ctx=n_ctx))


def expert_tensor_names(n_layer: int) -> set[str]:
    return {f"blk.{i}.ffn_{k}_exps.weight" for i in range(n_layer) for k in ("gate", "up", "down")}


# ---- placement


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe", "qwen3next"])
def test_cpu_moe_overrides_every_routed_expert_and_nothing_else(tiny_models, arch):
    with load(tiny_models(arch), Placement(cpu_moe_all=True)) as eng:
        names = {t for t, _ in eng.placement.overridden_tensors}
        assert names == expert_tensor_names(4)
        assert {b for _, b in eng.placement.overridden_tensors} == {"CPU"}
        assert eng.placement.cpu_moe_layers == (0, 1, 2, 3)
        # Shared experts, the router and attention stay where the layer is.
        assert not any("shexp" in n or "attn" in n or "gate_inp" in n for n in names)


def test_n_cpu_moe_overrides_exactly_the_first_layers(tiny_models):
    with load(tiny_models("qwen3moe"), Placement.n_cpu_moe(2)) as eng:
        layers = {int(EXPS.match(t).group(1)) for t, _ in eng.placement.overridden_tensors}  # type: ignore[union-attr]
        assert layers == {0, 1}
        assert len(eng.placement.overridden_tensors) == 6
        assert eng.placement.cpu_moe_layers == (0, 1)


def test_no_placement_overrides_nothing(tiny_models):
    with load(tiny_models("qwen3moe")) as eng:
        assert eng.placement.overridden_tensors == ()
        assert eng.placement.cpu_moe_layers == ()


def test_dense_model_has_no_experts_to_move(tiny_models):
    with load(tiny_models("qwen3"), Placement(cpu_moe_all=True)) as eng:
        assert eng.placement.overridden_tensors == ()


def test_explicit_patterns_and_single_tensors(tiny_models):
    placement = Placement(
        expert_cpu_tensors=("blk.3.ffn_down_exps.weight",),
        extra_overrides=((r"blk\.1\.ffn_up_exps", "CPU"),),
    )
    with load(tiny_models("qwen3moe"), placement) as eng:
        assert {t for t, _ in eng.placement.overridden_tensors} == {
            "blk.3.ffn_down_exps.weight",
            "blk.1.ffn_up_exps.weight",
        }


def test_unknown_buffer_type_is_a_usage_error(tiny_models):
    with pytest.raises(errors.UsageError, match="unknown buffer type"):
        load(tiny_models("qwen3moe"), Placement(extra_overrides=(("ffn", "NOPE0"),)))


def test_reports_buffer_sizes_per_kind(tiny_models):
    with load(tiny_models("qwen3moe"), n_ctx=512) as eng:
        kinds = {b.kind for b in eng.placement.buffers}
        assert {"model", "kv", "compute"} <= kinds
        # f16 KV: 512 cells x 4 layers x (K+V) x 2 heads x 32 dims x 2 bytes.
        assert eng.placement.total("kv") == 512 * 4 * 2 * 64 * 2
        assert eng.placement.total("model", "CPU") > 1_000_000
    with load(tiny_models("qwen35moe"), n_ctx=512) as eng:
        # The hybrid keeps KV for its one attention layer, plus a recurrent state.
        # llama.cpp logs MiB with two decimals, so allow one unit of its last digit.
        assert abs(eng.placement.total("kv") - 512 * 1 * 2 * 64 * 2) <= 0.01 * 2**20
        assert eng.placement.total("rs") > 0


def test_log_is_captured_not_printed(tiny_models, capfd):
    with load(tiny_models("qwen3moe"), Placement(cpu_moe_all=True)) as eng:
        assert any("overridden to CPU" in ln for ln in eng.log_lines)
    out, err = capfd.readouterr()
    assert "overridden" not in out + err


def test_split_model_loads_all_shards(tiny_models):
    path = tiny_models("qwen3moe", split=2)
    assert path.name.endswith("-00001-of-00002.gguf")
    with load(path) as eng:
        assert eng.meta.n_layer == 4
        assert eng.generate(eng.tokenize(PROMPT), GREEDY, max_tokens=4).text() is not None


# ---- generation


@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe", "qwen35moe", "qwen3next"])
def test_pieces_join_to_the_detokenized_answer(tiny_models, arch):
    with load(tiny_models(arch)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=7), max_tokens=24)
        pieces = list(gen)
        answer_tokens = [t for t in gen.tokens if not eng.is_eog(t)]
        assert "".join(pieces) == eng.detokenize(answer_tokens)
        assert gen.finish_reason in ("stop", "length")
        assert gen.stats is not None and gen.stats.generated_tokens == len(gen.tokens)


def test_control_tokens_render_as_nothing_but_think_tags_show(tiny_models):
    with load(tiny_models("qwen3moe")) as eng:
        im_end, think = eng.tokenize("<|im_end|>"), eng.tokenize("<think>")
        assert len(im_end) == 1 and len(think) == 1
        assert eng.detokenize(im_end) == ""
        assert eng.detokenize(think) == "<think>"
        assert eng.token_text(im_end[0]) == "<|im_end|>"


def test_same_seed_same_answer(tiny_models):
    with load(tiny_models("qwen3moe")) as eng:
        prompt = eng.tokenize(PROMPT)
        a = eng.generate(prompt, SamplingParams(seed=3), max_tokens=16).text()
        eng.reset()
        b = eng.generate(prompt, SamplingParams(seed=3), max_tokens=16).text()
        assert a == b


def test_stops_at_end_of_generation(tiny_models):
    with load(tiny_models("qwen3moe", eos_bias=10.0)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=1), max_tokens=50)
        assert gen.text() == ""
        assert gen.finish_reason == "stop"
        assert eng.is_eog(gen.tokens[-1]) and len(gen.tokens) == 1


def test_stops_at_max_tokens(tiny_models):
    # steer=2 bans every special token: the model can only stop by running out of tokens.
    with load(tiny_models("qwen3moe", steer=2)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=1), max_tokens=37)
        gen.text()
        assert gen.finish_reason == "length"
        assert gen.n_generated == 37


def test_unsteered_model_cannot_overrun_max_tokens(tiny_models):
    # Raw random weights emit runs of UTF-8 lead bytes; every one of them still counts.
    with load(tiny_models("qwen3moe", steer=0, n_layer=8)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), GREEDY, max_tokens=60)
        text = gen.text()
        assert gen.n_generated <= 60
        assert isinstance(text, str)
        assert gen.finish_reason in ("stop", "length")


def test_multibyte_characters_come_out_whole(tiny_models):
    with load(tiny_models("qwen3moe", steer=2)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), GREEDY, max_tokens=6)
        # Byte-level vocab: "é" is two tokens (0xC3, 0xA9), "€" three.
        gen.force_text("é€")
        pieces = list(gen)
        assert gen.tokens[:5] == [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
        assert pieces[:2] == ["é", "€"]
        assert all("\ufffd" not in p for p in pieces)


def test_cancel_stops_mid_stream(tiny_models):
    with load(tiny_models("qwen3moe", steer=2)) as eng:
        cancel = threading.Event()
        gen = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=1), 200, cancel)
        got = []
        for piece in gen:
            got.append(piece)
            if len(gen.tokens) == 5:
                cancel.set()
        assert gen.finish_reason == "cancelled"
        assert gen.n_generated == 5
        # The engine stays usable, and keeps what it evaluated for the next turn.
        again = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=1), 3)
        again.text()
        assert again.stats is not None and again.stats.eval_prompt_tokens == 1


def test_cancel_during_a_long_prompt_stops_between_batches(tiny_models):
    path = tiny_models("qwen3moe", steer=2)
    with Engine.load(path, LoadConfig(n_ctx=1024, n_batch=64, n_ubatch=64)) as eng:
        prompt = eng.tokenize(PROMPT + "word " * 100)
        cancel = threading.Event()
        cancel.set()
        gen = eng.generate(prompt, SamplingParams(seed=1), 50, cancel)
        assert gen.text() == ""
        assert gen.finish_reason == "cancelled" and gen.n_generated == 0
        # Nothing half-evaluated is believed to be cached: the next call evaluates it all.
        again = eng.generate(prompt, SamplingParams(seed=1), 3)
        again.text()
        assert again.stats is not None and again.stats.eval_prompt_tokens == len(prompt)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_second_call_evaluates_only_new_tokens(tiny_models, arch):
    with load(tiny_models(arch, steer=2)) as eng:
        first = eng.tokenize(PROMPT)
        gen = eng.generate(first, SamplingParams(seed=1), max_tokens=8)
        gen.text()
        assert gen.stats is not None and gen.stats.eval_prompt_tokens == len(first)
        follow = eng.tokenize("<|im_end|>\n<|im_start|>user\nand more<|im_end|>\n")
        second = first + gen.tokens + follow
        gen2 = eng.generate(second, SamplingParams(seed=1), max_tokens=4)
        gen2.text()
        assert gen2.stats is not None
        assert gen2.stats.prompt_tokens == len(second)
        # The last sampled token of turn 1 was never evaluated; it is the only extra one.
        assert gen2.stats.eval_prompt_tokens == len(follow) + 1


def test_diverging_prompt_drops_the_stale_tail(tiny_models):
    with load(tiny_models("qwen3moe", steer=2)) as eng:
        base = eng.tokenize(PROMPT)
        eng.generate(base, GREEDY, max_tokens=8).text()
        other = base[:-3] + eng.tokenize("xyz")
        gen = eng.generate(other, GREEDY, max_tokens=4)
        gen.text()
        assert gen.stats is not None and gen.stats.eval_prompt_tokens == 3
        # Same answer as a fresh engine on the same prompt: the stale tail was removed.
        eng.reset()
        assert eng.generate(other, GREEDY, max_tokens=4).text() == "".join(
            eng.detokenize(gen.tokens)
        )


def test_stats_are_filled(tiny_models):
    with load(tiny_models("qwen3moe", steer=2)) as eng:
        gen = eng.generate(eng.tokenize(PROMPT), SamplingParams(seed=1), max_tokens=20)
        gen.text()
        s = gen.stats
        assert s is not None
        assert s.prompt_tokens == s.eval_prompt_tokens == len(eng.tokenize(PROMPT))
        assert s.generated_tokens == 20
        assert s.ttft_ms > 0 and s.prefill_tok_s > 0 and s.decode_tok_s > 0
        assert s.llama_eval_ms > 0 and s.llama_sample_ms > 0
        assert set(s.as_dict()) == {
            "prompt_tokens",
            "eval_prompt_tokens",
            "generated_tokens",
            "ttft_ms",
            "prefill_tok_s",
            "decode_tok_s",
            "decode_wall_ms",
            "llama_eval_ms",
            "llama_sample_ms",
            "reused_tokens",
            "reused_from",
            "reuse_ms",
        }
        assert s.reused_tokens == 0 and s.reused_from == ""


def test_prompt_longer_than_context(tiny_models):
    with (
        load(tiny_models("qwen3moe"), n_ctx=256) as eng,
        pytest.raises(errors.ContextOverflowError, match="context holds 256"),
    ):
        eng.generate(list(range(100, 200)) * 3, GREEDY, 4)


# ---- bad files


def test_missing_file(tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="not found"):
        Engine.load(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am text")
    with pytest.raises(errors.InvalidModelError, match="not a GGUF"):
        Engine.load(p)


def test_truncated_gguf(tiny_models, tmp_path):
    data = tiny_models("qwen3moe").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.InvalidModelError, match="truncated or corrupt"):
        Engine.load(p)


def test_an_interrupt_while_loading_cancels_the_load(tiny_models, capfd):
    def on_progress(p: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Engine.load(tiny_models("qwen3moe"), LoadConfig(n_ctx=256), on_progress=on_progress)
    # Raised to the caller, not printed and swallowed inside the ctypes callback.
    assert "Exception ignored" not in capfd.readouterr().err
