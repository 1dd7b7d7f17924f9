"""Qwen3.8 in the planner (issue 17): the catalog entries, their size estimates, where
Qwen3.8-Flash-Next's n-gram table goes and why, and every `qwen4exp` buffer against what the
real llama.cpp allocates for generated models. Machines are `HardwareProfile` values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qwenrun import catalog, errors, offload
from qwenrun.catalog import lookup
from qwenrun.hub.header import read_local
from qwenrun.offload import Wishes
from qwenrun.planner.facts import NGRAM_TABLE, ModelFacts, kv_row_bytes, pad_ctx
from qwenrun.planner.recipes import estimate
from qwenrun.synthetic.qwen4exp import Qwen4ExpDims
from qwenrun.testing.hardware import machine
from qwenrun.testing.proc import error_line, run_qwenrun

GB = 10**9
GiB = 1 << 30
MIB = 1 << 20
FLASH = "qwen3.8-flash-next"

# ------------------------------------------------------------------------------ the catalog


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("qwen3.8-flash-next", FLASH),
        ("Qwen/Qwen3.8-Flash-Next-GGUF", FLASH),
        ("Qwen3.8 Flash Next", FLASH),
        ("qwen3.8-2.4t-a95b", "qwen3.8-2.4t-a95b"),
        ("qwen3.8-2.4t", "qwen3.8-2.4t-a95b"),
        ("qwen-agentworld-35b-a3b", "qwen-agentworld-35b-a3b"),
    ],
)
def test_the_new_models_are_found_by_their_names(text: str, name: str) -> None:
    assert lookup(text).name == name


def test_flash_next_shape_gives_the_gguf_parameter_count() -> None:
    # qwen38.md §2: 176.94B in the GGUF, of which the n-gram table is 320,001,536 × 160.
    counts = catalog.param_counts(lookup(FLASH).shape)
    assert counts.total == pytest.approx(176.94e9, rel=1e-4)
    table = next(t for t in catalog.tensor_layout(lookup(FLASH).shape) if t.name == NGRAM_TABLE)
    assert table.shape == (160, 320_001_536)
    # The table is not active: a token reads 16 of its rows.
    assert counts.active < 10e9


def test_modes_and_presets() -> None:
    flash, big = lookup(FLASH), lookup("qwen3.8-2.4t")
    assert flash.thinking == "hybrid" and flash.modes == ("think", "direct")
    assert (flash.presets["think"].temperature, flash.presets["think"].presence_penalty) == (1, 0)
    assert flash.presets["direct"].presence_penalty == 1.5
    assert big.thinking == "thinking" and big.modes == ("think",)
    assert big.shape.arch == "qwen35moe" and big.shape.n_layer == 92
    assert lookup("qwen-agentworld-35b-a3b").shape == lookup("qwen3.5-35b-a3b").shape


def test_entries_without_a_readable_header_say_so() -> None:
    for name in (FLASH, "qwen3.8-2.4t", "qwen-agentworld-35b-a3b"):
        assert lookup(name).unverified


def test_a_tiny_qwen4exp_file_has_the_layout_the_catalog_builds(tiny_models) -> None:
    d = Qwen4ExpDims()
    shape = replace(
        lookup(FLASH).shape,
        n_layer=4, n_embd=d.n_embd, n_head=d.n_head, n_head_kv=d.n_head_kv,
        head_dim=d.head_dim, n_expert=d.n_expert, n_expert_used=d.n_expert_used,
        expert_ff=d.expert_ff, shared_expert_ff=d.shexp_ff, vocab_size=265,
        ssm_state=d.ssm_state, ssm_groups=d.ssm_groups, ssm_v_heads=d.ssm_v_heads,
        hc_rank=d.hc_rank, indexer_heads=d.idx_heads, indexer_dim=d.idx_dim,
        ple_row=d.ple_row, ple_heads_per_ngram=d.heads_per_ngram, ple_table_rows=d.ple_rows,
    )  # fmt: skip
    real = read_local(tiny_models("qwen4exp"))
    laid = catalog.tensor_layout(shape)
    assert sorted((t.name, t.shape) for t in laid) == sorted(
        (t.name, t.shape) for t in real.tensors
    )


# unsloth's Flash-Next files (qwen38.md §2). The recipes alone (before the estimate is brought
# to the published size) come within 3 % from 3 bits up; unsloth's 2-bit and IQ3_XXS files are
# lighter than any llama.cpp type choice for the same class (their experts' down projections
# cannot go below 4.25 bits: rows of 640).
_FLASH_PUBLISHED = [
    ("UD-IQ1_S", 72.5 * GB, 0.03),
    ("UD-Q2_K_XL", 78.9 * GB, 0.08),
    ("UD-IQ3_XXS", 81_961_823_936, 0.08),
    ("UD-Q3_K_XL", 89_986_353_824, 0.03),
    ("UD-IQ4_XS", 93.7 * GB, 0.03),
    ("UD-Q4_K_XL", 111_334_654_784, 0.03),
    ("UD-Q5_K_XL", 158.3 * GB, 0.03),
    ("UD-Q6_K_XL", 169.2 * GB, 0.03),
    ("Q8_0", 188.2 * GB, 0.005),
    ("BF16", 355 * GB, 0.005),
]


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "published", "tolerance"), _FLASH_PUBLISHED)
def test_flash_next_recipes_against_published_sizes(quant, published, tolerance) -> None:
    spec = lookup(FLASH)
    recipe_only = estimate(replace(spec, published={}), quant)
    assert recipe_only.total_bytes == pytest.approx(published, rel=tolerance)
    # With the published size known, the estimate is that size (its experts scaled).
    assert estimate(spec, quant).total_bytes == pytest.approx(published, abs=64)


def test_flash_next_tensor_classes_at_ud_q4_k_xl() -> None:
    types = {
        t.name: (t.ggml_type, t.n_bytes) for t in estimate(lookup(FLASH), "UD-Q4_K_XL").tensors
    }
    # The table at IQ4_NL, 28.80 GB; the experts' down projections (rows of 640) at Q5_1.
    assert types[NGRAM_TABLE] == ("IQ4_NL", 28_800_138_240)
    assert types["blk.0.ffn_down_exps.weight"][0] == "Q5_1"
    assert types["blk.0.ffn_gate_exps.weight"][0] == "Q4_K"
    assert types["blk.3.indexer.k_proj.weight"][0] == "F32"  # llama.cpp never quantizes it
    assert types["blk.0.hc_attn_norm.weight"][0] == "F32"
    q8 = {t.name: t.ggml_type for t in estimate(lookup(FLASH), "Q8_0").tensors}
    assert q8[NGRAM_TABLE] == "Q8_0"


def test_flash_next_facts_count_every_cache() -> None:
    facts = ModelFacts.from_info(estimate(lookup(FLASH), "UD-Q4_K_XL"))
    # qwen38.md §3.3: 12 × (2·2·256 + 128) × 2 B per token at f16, 14,688 B at q8_0.
    assert facts.kv_bytes(262_144, "f16") == 262_144 * 27_648
    assert facts.kv_bytes(262_144, "q8_0") == 262_144 * 14_688
    # 36 linear layers × 3,268,608 B plus the n-gram layer's conv history, 368,640 B.
    assert facts.rs_bytes == 118_038_528
    assert facts.ple_layer == 1 and facts.ple_rs_bytes == 368_640
    assert facts.table_bytes == 28_800_138_240
    assert NGRAM_TABLE not in {t.name for layer in facts.expert_tensors for t in layer}
    classes = dict(facts.weight_classes)
    assert classes["n-gram table"] == facts.table_bytes
    assert sum(classes.values()) == facts.weight_bytes + facts.table_bytes
    assert {"hyper-connections", "indexer", "deltanet", "attention", "shared experts"} <= set(
        classes
    )


def test_the_n_gram_rows_go_with_their_layers_device() -> None:
    from qwenrun.planner.costs import Layout, usage

    facts = ModelFacts.from_info(estimate(lookup(FLASH), "UD-Q4_K_XL"))
    per_layer, ple = facts.rs_bytes_per_layer, facts.ple_rs_bytes
    # n_gpu_layers k: the output layer and the last k-1 blocks on the GPU.
    for blocks_on_cpu, cpu_rs in ((1, per_layer), (2, 2 * per_layer + ple), (0, 0)):
        use = usage(facts, Layout(n_ctx=4096, n_gpu_layers=48 - blocks_on_cpu + 1))
        assert use.cpu.rs == cpu_rs
        assert use.cpu.rs + use.gpu.rs == facts.rs_bytes
        assert use.gpu.ngram_table == 0 and use.cpu.ngram_table == facts.table_bytes


# ------------------------------------------------------------------------------ the table


def _flash(hw, **wishes) -> offload.Plan:
    return offload.plan_for_spec(lookup(FLASH), hw, Wishes(**wishes))


@pytest.mark.slow
def test_the_table_lives_in_ram_when_it_fits_beside_everything_else() -> None:
    p = _flash(machine(24, 128))
    assert p.ngram_table is not None and p.ngram_table.place == "ram"
    assert p.load.lazy_table is False
    assert p.cpu.bytes.ngram_table == p.ngram_table.n_bytes > 25 * GiB
    assert p.cpu.bytes.used <= p.cpu.budget
    assert p.gpu is not None and p.gpu.bytes.ngram_table == 0  # never on a GPU
    assert "fits beside everything else" in p.ngram_table.why


@pytest.mark.slow
def test_with_less_ram_the_table_is_read_from_the_disk_and_the_plan_says_so() -> None:
    p = _flash(machine(24, 64))
    assert p.ngram_table is not None and p.ngram_table.place == "disk"
    assert p.load.lazy_table is True
    assert p.cpu.bytes.ngram_table == 0 and p.cpu.bytes.used <= p.cpu.budget
    assert "fast local SSD" in p.ngram_table.why and "short" in p.ngram_table.why
    assert p.predicted_buffers()[("lazy", "CPU")] == p.ngram_table.n_bytes
    # Asked to keep it in RAM, the planner fits a smaller quant around it instead.
    forced = _flash(machine(24, 64), ngram_table="ram")
    assert forced.ngram_table is not None and forced.ngram_table.place == "ram"
    assert "as asked (--ngram-table ram)" in forced.ngram_table.why
    assert catalog.quant_rank(forced.quant) > catalog.quant_rank(p.quant)
    assert forced.cpu.bytes.used <= forced.cpu.budget


def test_the_disk_is_priced_in_the_speed() -> None:
    ram = _flash(machine(24, 192), quant="UD-IQ4_XS", n_ctx=16384)
    disk = _flash(machine(24, 192), quant="UD-IQ4_XS", n_ctx=16384, ngram_table="disk")
    assert ram.ngram_table and ram.ngram_table.place == "ram"
    assert disk.ngram_table and disk.ngram_table.place == "disk"
    assert disk.load.placement == ram.load.placement  # only the table moved
    # 33 vs 11 tok/s reported: ~61 ms more per token from the disk.
    extra = 1 / disk.decode_tok_s - 1 / ram.decode_tok_s
    assert extra == pytest.approx(1 / 11 - 1 / 33, rel=0.01)


def test_a_table_asked_for_in_ram_that_cannot_be_there_does_not_fit() -> None:
    with pytest.raises(errors.DoesNotFitError) as info:
        _flash(machine(None, 48), ngram_table="ram")
    assert "--ngram-table ram" in info.value.message
    # Read from the disk, the smallest quants fit in that RAM.
    assert _flash(machine(None, 48)).ngram_table.place == "disk"  # type: ignore[union-attr]


@pytest.mark.slow
def test_with_several_gpus_the_table_stays_in_this_machines_ram() -> None:
    p = _flash(machine(None, 128), gpu_mem_bytes=(24 * GiB, 24 * GiB))
    assert p.spread and p.ngram_table is not None and p.ngram_table.place == "ram"
    on_gpus = [d for d in p.devices if d.kind != "cpu"]
    assert len(on_gpus) == 2 and all(d.bytes.ngram_table == 0 for d in on_gpus)
    assert p.cpu.bytes.ngram_table == p.ngram_table.n_bytes
    assert p.load.lazy_table is False
    # UD-Q4_K_XL leaves 32 GiB of experts for 57.6 GiB of RAM: no room for 26.8 more.
    small = _flash(machine(None, 64), gpu_mem_bytes=(24 * GiB, 24 * GiB), quant="UD-Q4_K_XL")
    assert small.spread and small.ngram_table is not None
    assert small.ngram_table.place == "disk" and small.cpu.bytes.ngram_table == 0
    assert small.load.lazy_table is True
    assert all(d.bytes.used <= d.budget for d in small.devices)


def test_models_without_a_table_have_no_table_plan() -> None:
    p = offload.plan_for_spec(lookup("qwen3.5-35b-a3b"), machine(24, 64))
    assert p.ngram_table is None and p.load.lazy_table is None
    assert p.to_dict()["ngram_table"] is None


def test_a_bad_table_place_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="--ngram-table"):
        Wishes(ngram_table="ssd").validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ plan, as run


@pytest.mark.slow
def test_plan_flash_next_with_24_gib_and_128_gib() -> None:
    proc = run_qwenrun("plan", FLASH, "--gpu-mem", "24GiB", "--ram", "128GiB")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Qwen3.8-Flash-Next" in out and "UD-" in out
    assert "N-gram table" in out and "in RAM" in out
    assert "n-gram table" in out and "decode ≈" in out  # the bytes row, and the speed
    doc = json.loads(
        run_qwenrun("plan", FLASH, "--gpu-mem", "24GiB", "--ram", "128GiB", "--json").stdout
    )
    assert doc["ngram_table"]["place"] == "ram" and doc["ngram_table"]["in_ram"]
    assert doc["weights_by_class"]["n-gram table"] == doc["ngram_table"]["bytes"]
    assert doc["predicted"]["decode_tok_s"] > 0


@pytest.mark.slow
def test_plan_flash_next_with_64_gib_reads_the_table_from_disk() -> None:
    proc = run_qwenrun("plan", FLASH, "--gpu-mem", "24GiB", "--ram", "64GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    table = doc["ngram_table"]
    assert table["place"] == "disk" and table["lazy_read"] and table["needs_fast_disk"]
    ram = next(d for d in doc["devices"] if d["kind"] == "cpu")
    assert ram["ngram_table"] == 0 and ram["used"] <= ram["budget"]
    assert any("stays in the file" in r for r in doc["reasons"])
    forced = json.loads(
        run_qwenrun(
            "plan", FLASH, "--gpu-mem", "24GiB", "--ram", "64GiB", "--ngram-table", "ram", "--json"
        ).stdout
    )
    assert forced["ngram_table"]["place"] == "ram"
    assert "--ngram-table" in error_line(run_qwenrun("plan", FLASH, "--ngram-table", "ssd"), 2)


@pytest.mark.slow
def test_plan_2_4t_on_one_machine_says_what_would_hold_it() -> None:
    proc = run_qwenrun("plan", "qwen3.8-2.4t", "--gpu-mem", "24GiB", "--ram", "128GiB")
    line = error_line(proc, 4)
    assert "Qwen3.8-2.4T-A95B does not fit" in line and "needs about" in line
    assert "more machines like this one: run `qwenrun worker`" in line


# ------------------------------------------------------------------------------ llama.cpp


def _tolerance(actual: int) -> float:
    # As tests/test_offload.py: 3 %, or 8 MiB for the planner's fixed compute slack.
    return max(0.03 * actual, 8 * MIB)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("vocab", "n_ctx", "table"),
    [(248_320, 8192, None), (248_320, 8192, "disk"), (None, 65536, None)],
)
def test_every_qwen4exp_buffer_is_what_llama_cpp_allocates(tiny_models, vocab, n_ctx, table):
    from qwenrun.engine.llama import Engine
    from qwenrun.hwprobe import probe

    path = tiny_models("qwen4exp", vocab_size=vocab, dtype="f16")
    p = offload.plan_for_file(
        path, replace(probe(), gpus=()), Wishes(n_ctx=n_ctx, ngram_table=table)
    )
    assert p.ngram_table is not None
    assert p.ngram_table.place == (table or "ram")  # a tiny table fits any RAM
    with Engine.load(path, p.load) as engine:
        report = engine.placement
    predicted = p.predicted_buffers()
    for kind in ("model", "kv", "rs", "compute", "output", "lazy"):
        actual = report.total(kind, "CPU")
        guess = predicted.get((kind, "CPU"), 0)
        assert abs(guess - actual) <= _tolerance(actual), (kind, guess, actual)
    facts = ModelFacts.from_info(read_local(path))
    # The indexer's cache, read apart from the attention KV: one key row per cell and layer.
    idx = pad_ctx(n_ctx) * len(facts.attn_layers) * kv_row_bytes("f16", facts.indexer_dim)
    logged = 0.01 * MIB  # llama.cpp logs sizes to two decimals of MiB
    assert idx > 0 and abs(report.total("kv", part="indexer") - idx) <= logged
    assert abs(report.total("rs") - facts.rs_bytes) <= logged  # with the n-gram conv row
    if table == "disk":
        assert report.lazy_tensors == (NGRAM_TABLE,)
        assert abs(report.total("lazy") - facts.table_bytes) <= logged
    else:
        assert report.lazy_tensors == () and report.total("lazy") == 0


@pytest.mark.slow
def test_the_recurrent_state_has_the_n_gram_layers_conv_row(tiny_models):
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig

    # n_embd 1,024: the row (3 × 3 × 4 streams × 1,024 f32) is big enough to read in the log.
    path = tiny_models("qwen4exp", dims=Qwen4ExpDims(ple_row=256))
    facts = ModelFacts.from_info(read_local(path))
    assert facts.ple_rs_bytes == 3 * 3 * 4 * 1024 * 4
    with Engine.load(path, LoadConfig(n_ctx=1024, prompt_cache=0)) as engine:
        line = next(ln for ln in engine.log_lines if "P (f32):" in ln)
    logged = float(line.split("P (f32):")[1].split()[0]) * MIB
    assert abs(logged - facts.ple_rs_bytes) <= 0.01 * MIB
    assert abs(engine.placement.total("rs") - facts.rs_bytes) <= 0.01 * MIB


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.slow
def test_the_table_is_read_into_ram_or_left_in_the_file_as_the_plan_says(tmp_path):
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig
    from qwenrun.engine.values import SamplingParams
    from qwenrun.synthetic.tiny_gguf import write_model

    # A 128 MiB f32 table (16 values a row); memory-mapping off, as with experts in RAM.
    dims = Qwen4ExpDims(ple_rows=1 << 21, ple_type="f32")
    path = write_model(tmp_path, "qwen4exp", dims=dims, steer=1)
    table = 128 * MIB
    prompt = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    grew = {}
    for lazy in (False, True):
        before = _rss_anon()
        config = LoadConfig(n_ctx=1024, use_mmap=False, lazy_table=lazy, prompt_cache=0)
        with Engine.load(path, config) as engine:
            grew[lazy] = _rss_anon() - before
            gen = engine.generate(engine.tokenize(prompt), SamplingParams(temperature=0), 8)
            gen.text()
            assert gen.n_generated == 8  # the rows are read either way
            assert (engine.placement.total("lazy") == table) == lazy
    assert grew[False] >= table  # read whole into the process's memory
    assert grew[True] < table // 4  # left in the file: a mapping, no copy
