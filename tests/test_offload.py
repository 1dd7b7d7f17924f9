"""The offload planner over hardware values × catalog models, and against llama.cpp itself.

Hardware is a value here (`HardwareProfile`), so "12 GiB GPU + 32 GiB RAM" needs no such
machine. Model sizes come from `recipes.estimate` (the catalog's shapes and each quant's
recipe) and, for the accuracy tests, from real generated GGUFs that llama.cpp loads.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest

from qwenrun import catalog, errors, offload, units
from qwenrun.engine import loadconfig
from qwenrun.hwprobe import HardwareProfile
from qwenrun.offload import Plan, Wishes
from qwenrun.planner import search
from qwenrun.planner.budget import Budget
from qwenrun.planner.facts import ModelFacts, pad_ctx
from qwenrun.testing.hardware import machine
from qwenrun.units import GIB, MIB

QWEN3_30B = "qwen3-30b-a3b"
QWEN35_35B = "qwen3.5-35b-a3b"


@functools.cache
def options(name: str) -> tuple[offload.QuantOption, ...]:
    return tuple(offload.options_for_spec(catalog.lookup(name)))


def plan_or_none(name: str, hw: HardwareProfile, wishes: Wishes | None = None) -> Plan | None:
    try:
        return offload.plan(options(name), hw, wishes, catalog.lookup(name))
    except errors.DoesNotFitError:
        return None


NO_GPU = [(None, 16), (None, 32), (None, 64)]
WITH_GPU = [(8, 32), (12, 32), (16, 64), (24, 64), (48, 128), (80, 256), (80, 512)]
MODELS = sorted({s.shape for s in catalog.CATALOG}, key=str)  # one model per distinct shape
MODEL_NAMES = [next(s.name for s in catalog.CATALOG if s.shape == shape) for shape in MODELS]


# --------------------------------------------------------------------------------------
# Budgets are never exceeded


def _assert_within_budget(p: Plan, hw: HardwareProfile) -> None:
    budget = Budget.from_hw(hw)
    assert p.cpu.bytes.used <= budget.ram, (p.model, p.quant)
    assert p.cpu.bytes.used <= p.cpu.budget
    if p.gpu is not None:
        assert p.gpu.bytes.used <= budget.gpu, (p.model, p.quant)
        assert p.gpu.bytes.used + p.gpu.reserved <= hw.gpus[0].free_bytes
    # The plan accounts for every loaded weight exactly once.
    total = p.cpu.bytes.weights + (p.gpu.bytes.weights if p.gpu else 0)
    facts = ModelFacts.from_info(
        next(o for o in options(_catalog_name(p)) if o.name == p.quant).info
    )
    assert total == facts.weight_bytes


def _catalog_name(p: Plan) -> str:
    return next(s.name for s in catalog.CATALOG if s.display == p.model)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("gpu_gib,ram_gib", NO_GPU + WITH_GPU)
def test_plans_never_exceed_any_budget(name: str, gpu_gib: float | None, ram_gib: float):
    hw = machine(gpu_gib, ram_gib)
    p = plan_or_none(name, hw)
    if p is None:
        # It may not fit, but then it must be because the machine is too small: the
        # smallest quant's weights alone outweigh the memory to plan with.
        smallest = min(ModelFacts.from_info(o.info).weight_bytes for o in options(name))
        budget = Budget.from_hw(hw)
        assert smallest > 0.5 * (budget.ram + budget.gpu)
        return
    _assert_within_budget(p, hw)
    assert p.n_ctx >= search.MIN_CTX
    if gpu_gib is None:
        assert p.gpu is None
        assert p.load.placement.n_gpu_layers == 0
        assert p.load.mmap_enabled()


@pytest.mark.slow
def test_small_models_fit_everywhere_and_big_ones_need_big_machines():
    for gpu_gib, ram_gib in NO_GPU[1:] + WITH_GPU:
        assert plan_or_none(QWEN3_30B, machine(gpu_gib, ram_gib)) is not None
    assert plan_or_none("qwen3.5-397b-a17b", machine(None, 64)) is None
    assert plan_or_none("qwen3.5-397b-a17b", machine(80, 512)) is not None


# --------------------------------------------------------------------------------------
# Monotonic in VRAM


@pytest.mark.parametrize("name", [QWEN3_30B, QWEN35_35B, "qwen3-next-80b-a3b-instruct"])
@pytest.mark.parametrize("quant", ["Q4_K_M", "UD-Q2_K_XL"])
def test_more_vram_never_gives_fewer_gpu_experts_or_less_speed(name: str, quant: str):
    wishes = Wishes(quant=quant, n_ctx=16384)
    previous: Plan | None = None
    for gib in (4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 80):
        p = plan_or_none(name, machine(gib, 128), wishes)
        assert p is not None
        if previous is not None:
            assert p.gpu_expert_layers >= previous.gpu_expert_layers, gib
            assert p.decode_tok_s >= previous.decode_tok_s - 1e-9, gib
            prev_ngl = _gpu_layers(previous)
            assert _gpu_layers(p) >= prev_ngl, gib
        previous = p
    assert previous is not None and previous.gpu_expert_layers == previous.n_layer


def _gpu_layers(p: Plan) -> int:
    ngl = p.load.placement.n_gpu_layers
    return 10**6 if ngl < 0 else ngl


def test_more_ram_never_gives_a_worse_quant():
    ranks = []
    for ram in (16, 24, 32, 48, 64, 128):
        p = plan_or_none(QWEN3_30B, machine(None, ram))
        assert p is not None
        ranks.append(catalog.quant_rank(p.quant))
    assert ranks == sorted(ranks, reverse=True)


# --------------------------------------------------------------------------------------
# Placement details


@pytest.mark.parametrize("order", ["last", "first"])
def test_12gib_gpu_puts_most_experts_on_cpu_and_fills_the_rest(order):
    hw = machine(12, 32)
    wishes = Wishes(quant="Q4_K_M", cpu_moe_from=None if order == "last" else "first")
    p = plan_or_none(QWEN3_30B, hw, wishes)
    assert p is not None and p.gpu is not None
    pl = p.load.placement
    assert pl.n_gpu_layers == -1
    n = len(pl.expert_cpu_layers)
    # By default the last N layers' experts (llama.cpp's --fit); asked, the first N.
    run = tuple(range(48 - n, 48)) if order == "last" else tuple(range(n))
    assert pl.expert_cpu_layers == run
    assert 24 <= p.cpu_expert_layers < 48  # most, not all
    # The single tensors left on the CPU belong to the layer next to the run, and the VRAM
    # left over cannot take another of them.
    boundary_layer = 48 - n - 1 if order == "last" else n
    leftover = p.gpu.budget - p.gpu.bytes.used
    for name in pl.expert_cpu_tensors:
        assert name.startswith(f"blk.{boundary_layer}.")
    info = next(o for o in options(QWEN3_30B) if o.name == "Q4_K_M").info
    boundary = [t for t in info.tensors if t.layer == boundary_layer and t.is_routed_expert]
    on_gpu = [t for t in boundary if t.name not in pl.expert_cpu_tensors]
    still_cpu = [t for t in boundary if t.name in pl.expert_cpu_tensors]
    if still_cpu:
        assert min(t.n_bytes for t in still_cpu) > leftover - 64 * MIB
    assert on_gpu or not pl.expert_cpu_tensors
    # Override patterns are llama.cpp's: per layer, then exact tensor names.
    pats = [pat for pat, buft in pl.override_patterns()]
    assert all(buft == "CPU" for _, buft in pl.override_patterns())
    assert pats[0] == rf"blk\.{run[0]}\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    assert not p.load.mmap_enabled()


@pytest.mark.slow
def test_a_big_gpu_holds_everything_and_grows_the_context():
    p = plan_or_none(QWEN35_35B, machine(80, 256))
    assert p is not None and p.gpu is not None
    assert p.cpu_expert_layers == 0
    assert p.load.placement.override_patterns() == []
    assert p.n_ctx == p.native_ctx == 262144
    # token_embd stays on the CPU: llama.cpp never offloads the input layer
    assert p.cpu.bytes.weights_dense > 0


@pytest.mark.slow
def test_a_gpu_too_small_for_all_attention_layers_gets_fewer_gpu_layers():
    p = plan_or_none("qwen3-235b-a22b", machine(6, 192), Wishes(n_ctx=4096))
    assert p is not None
    assert p.load.placement.cpu_moe_all
    assert 0 < p.load.placement.n_gpu_layers < 95
    assert any("wholly on the CPU" in r for r in p.reasons)


def test_no_gpu_means_all_on_cpu_memory_mapped():
    p = plan_or_none(QWEN3_30B, machine(None, 32))
    assert p is not None
    assert p.gpu is None and p.load.placement.n_gpu_layers == 0
    assert p.load.mmap_enabled()
    assert p.to_dict()["devices"][0]["device"] == "cpu"


def test_gpu_the_build_cannot_use_is_not_planned_for():
    hw = replace(machine(24, 64), gpu_offload=False)
    p = plan_or_none(QWEN3_30B, hw)
    assert p is not None and p.gpu is None
    assert any("cannot use the GPU" in r for r in p.reasons)


def test_hypothetical_gpu_and_ram_from_wishes():
    p = plan_or_none(
        QWEN3_30B, machine(None, 8), Wishes(gpu_mem_bytes=(24 * GIB,), ram_bytes=64 * GIB)
    )
    assert p is not None and p.gpu is not None
    assert p.gpu.capacity == 24 * GIB and p.cpu.capacity == 64 * GIB
    q = plan_or_none(QWEN3_30B, machine(24, 64), Wishes(gpu_mem_bytes=(0,)))
    assert q is not None and q.gpu is None


# --------------------------------------------------------------------------------------
# Memory model


def test_hybrids_get_a_smaller_kv_cache_than_an_all_attention_model():
    hw = machine(24, 64)
    wishes = Wishes(quant="Q4_K_M", n_ctx=32768)
    dense = plan_or_none(QWEN3_30B, hw, wishes)
    hybrid = plan_or_none(QWEN35_35B, hw, wishes)
    assert dense is not None and hybrid is not None
    kv_dense = dense.cpu.bytes.kv + (dense.gpu.bytes.kv if dense.gpu else 0)
    kv_hybrid = hybrid.cpu.bytes.kv + (hybrid.gpu.bytes.kv if hybrid.gpu else 0)
    assert kv_dense == 3 * GIB  # 48 layers × 32768 × 4 heads × 128 × 2 (K, V) × 2 bytes
    assert kv_hybrid == 640 * MIB  # 10 attention layers of 40, 2 KV heads of 256
    rs = hybrid.cpu.bytes.rs + (hybrid.gpu.bytes.rs if hybrid.gpu else 0)
    assert 50 * MIB < rs < 80 * MIB  # catalog.md: ≈63 MiB of recurrent state
    assert dense.cpu.bytes.rs == 0


def test_kv_type_table_matches_gguf_tables():
    # The one KV type table: the cost model's bytes and the engine's ggml ids both come from it.
    import gguf

    for name, kv in loadconfig.KV_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name.upper()]
        assert gguf.GGML_QUANT_SIZES[qtype] == (kv.block_elems, kv.block_bytes)
        assert int(qtype) == kv.ggml_id


def test_q8_kv_cache_is_about_half():
    hw = machine(24, 64)
    f16 = plan_or_none(QWEN3_30B, hw, Wishes(quant="Q4_K_M", n_ctx=32768))
    q8 = plan_or_none(QWEN3_30B, hw, Wishes(quant="Q4_K_M", n_ctx=32768, kv_type="q8_0"))
    assert f16 is not None and q8 is not None and f16.gpu and q8.gpu
    assert q8.gpu.bytes.kv == f16.gpu.bytes.kv * 34 // 64
    assert q8.gpu_expert_layers >= f16.gpu_expert_layers


def test_context_is_capped_and_never_below_the_minimum():
    p = plan_or_none(QWEN35_35B, machine(None, 64))
    assert p is not None
    assert p.n_ctx == search.DEFAULT_CTX_CAP  # native 262,144, capped
    small = plan_or_none(QWEN3_30B, machine(None, 16))
    assert small is not None and small.n_ctx >= search.MIN_CTX


# --------------------------------------------------------------------------------------
# User constraints are honoured, the rest fitted around them


def test_fixed_quant_context_kv_and_n_cpu_moe_are_kept():
    wishes = Wishes(quant="q4_k_m", n_ctx=20000, kv_type="q8_0", n_cpu_moe=30)
    p = plan_or_none(QWEN3_30B, machine(12, 32), wishes)
    assert p is not None
    assert p.quant == "Q4_K_M"
    assert p.n_ctx == pad_ctx(20000)
    assert p.load.kv_type == "q8_0"
    assert p.load.placement.expert_cpu_layers == tuple(range(30))
    assert p.load.placement.expert_cpu_tensors == ()


def test_a_fixed_n_cpu_moe_that_overfills_the_gpu_is_fitted_by_moving_whole_layers():
    # llama.cpp's --fit gives up when --n-cpu-moe is set; the planner keeps it and fits
    # the rest: fewer GPU layers.
    p = plan_or_none(QWEN3_30B, machine(8, 64), Wishes(quant="Q4_K_M", n_cpu_moe=0, n_ctx=8192))
    assert p is not None and p.gpu is not None
    assert p.load.placement.expert_cpu_layers == ()
    assert 0 < p.load.placement.n_gpu_layers < 49
    _assert_within_budget(p, machine(8, 64))


def test_fixed_gpu_layers_are_kept_and_experts_fitted():
    p = plan_or_none(QWEN3_30B, machine(12, 32), Wishes(n_gpu_layers=30, quant="Q4_K_M"))
    assert p is not None
    assert p.load.placement.n_gpu_layers == 30


def test_an_unavailable_quant_is_a_usage_error():
    with pytest.raises(errors.UsageError, match="not available"):
        offload.plan(options(QWEN3_30B), machine(12, 32), Wishes(quant="Q7_K"))


@pytest.mark.parametrize(
    "wishes",
    [Wishes(n_ctx=8), Wishes(n_cpu_moe=-1), Wishes(kv_type="q3_k"), Wishes(n_gpu_layers=-5)],
)
def test_bad_wishes_are_usage_errors(wishes: Wishes):
    with pytest.raises(errors.UsageError):
        offload.plan(options(QWEN3_30B), machine(12, 32), wishes)


# --------------------------------------------------------------------------------------
# When nothing fits


def test_does_not_fit_says_what_is_needed_and_offers_smaller_models():
    with pytest.raises(errors.DoesNotFitError) as info:
        offload.plan(
            options("qwen3-235b-a22b"), machine(None, 32), spec=catalog.lookup("qwen3-235b-a22b")
        )
    err = info.value
    assert re.search(r"needs about [\d.]+ GiB", err.message)
    assert "RAM" in err.message
    assert err.alternatives
    assert any("qwen3" in a and "smaller" in a for a in err.alternatives)
    assert "\n" not in err.message


def test_does_not_fit_with_a_fixed_quant_offers_another_quant():
    with pytest.raises(errors.DoesNotFitError) as info:
        offload.plan(options(QWEN3_30B), machine(None, 24), Wishes(quant="Q8_0"))
    alts = info.value.alternatives
    assert any(a.startswith("another quant") for a in alts)


def test_does_not_fit_with_a_fixed_context_offers_a_smaller_one():
    with pytest.raises(errors.DoesNotFitError) as info:
        offload.plan(
            options(QWEN3_30B), machine(None, 24), Wishes(quant="UD-Q4_K_XL", n_ctx=131072)
        )
    assert any(a.startswith("--ctx 4096") for a in info.value.alternatives)
    assert any(a.startswith("--kv-type q8_0") for a in info.value.alternatives) or True


# --------------------------------------------------------------------------------------
# The plan as data


def test_to_dict_carries_the_whole_plan():
    p = plan_or_none(QWEN3_30B, machine(12, 32))
    assert p is not None
    d = p.to_dict()
    for key in (
        "quant",
        "n_ctx",
        "kv_type",
        "n_gpu_layers",
        "expert_cpu_layers",
        "expert_cpu_tensors",
        "override_patterns",
        "devices",
        "predicted",
        "reasons",
        "estimated",
    ):
        assert key in d
    assert d["estimated"] is True
    gpu_dev = d["devices"][0]
    assert gpu_dev["device"] == "gpu"
    assert gpu_dev["used"] <= gpu_dev["budget"]
    assert d["predicted"]["decode_tok_s"] > 0
    assert any("estimated" in r for r in d["reasons"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("12GiB", 12 * GIB),
        ("24G", 24 * GIB),
        ("24gb", 24 * GIB),
        ("512M", 512 * MIB),
        ("1.5T", int(1.5 * (1 << 40))),
        ("0", 0),
        ("16", 16 * GIB),
        (" 8 GiB ", 8 * GIB),
    ],
)
def test_parse_size(text: str, expected: int):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "twelve", "12 parsecs", "-4G", "12iB", "1e3G"])
def test_parse_size_rejects_nonsense(text: str):
    with pytest.raises(errors.UsageError, match="cannot read"):
        units.parse_size(text, "--gpu-mem")


# --------------------------------------------------------------------------------------
# Against llama.cpp: the predicted buffers are the ones it allocates (CPU here)


def _tolerance(actual: int) -> float:
    # 3 % (the target is 3 % or 64 MiB); 8 MiB covers the planner's fixed slack on
    # the compute buffer and llama.cpp's log rounding of small buffers.
    return max(0.03 * actual, 8 * MIB)


# (arch, vocab, context): Qwen's real vocabulary makes the logits phase the compute peak; a
# small vocabulary at a long context makes it the attention phase (the mask).
ACCURACY_CASES = [
    ("qwen3moe", 151936, 8192),
    ("qwen35moe", 151936, 8192),
    ("qwen3next", 151936, 8192),
    ("qwen3", 151936, 8192),
    ("qwen3moe", None, 131072),
    ("qwen35moe", None, 131072),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,vocab,n_ctx", ACCURACY_CASES)
def test_cpu_buffers_match_llama_cpp(tiny_models, arch: str, vocab: int | None, n_ctx: int):
    from qwenrun.engine.llama import Engine
    from qwenrun.hwprobe import probe

    path = tiny_models(arch, vocab_size=vocab, dtype="f16")
    hw = probe()
    p = offload.plan_for_file(path, replace(hw, gpus=()), Wishes(n_ctx=n_ctx))
    assert p.gpu is None
    with Engine.load(path, p.load) as engine:
        report = engine.placement
    predicted = p.predicted_buffers()
    for kind in ("model", "kv", "rs", "compute", "output"):
        actual = report.total(kind, "CPU")
        guess = predicted.get((kind, "CPU"), 0)
        assert abs(guess - actual) <= _tolerance(actual), (kind, guess, actual)
    hybrid = arch in ("qwen35moe", "qwen3next")
    assert (predicted.get(("rs", "CPU"), 0) > 0) == hybrid
