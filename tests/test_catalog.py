"""The catalog's invariants and its facts, checked against reference/catalog.md."""

from __future__ import annotations

import re

import pytest

from qwenrun import catalog, errors
from qwenrun.catalog import CATALOG, MODES_BY_KIND, QUANT_LADDER, lookup
from qwenrun.hub import names


def _spec(name: str) -> catalog.ModelSpec:
    return next(s for s in CATALOG if s.name == name)


# ------------------------------------------------------------------------------ names


def test_names_and_aliases_are_unique_across_the_catalog() -> None:
    keys = [k.lower() for s in CATALOG for k in (s.name, *s.aliases)]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert dupes == []


def test_names_are_canonical_lower_case() -> None:
    for s in CATALOG:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", s.name), s.name
        assert s.name == s.display.lower()
        for a in s.aliases:
            assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", a), a


def test_every_name_and_alias_looks_up_its_own_spec() -> None:
    for s in CATALOG:
        for key in (s.name, *s.aliases, s.display, s.name.upper()):
            assert lookup(key) is s


@pytest.mark.parametrize(
    ("text", "name"),
    [
        # The hub id and llama.cpp's `general.name` spelling find the original hybrid.
        ("Qwen3-30B-A3B", "qwen3-30b-a3b"),
        ("Qwen3 30B A3B", "qwen3-30b-a3b"),
        ("Qwen/Qwen3-30B-A3B-GGUF", "qwen3-30b-a3b"),
        ("qwen3-30b-a3b-instruct", "qwen3-30b-a3b-instruct-2507"),
        ("Qwen3 30B A3B Instruct 2507", "qwen3-30b-a3b-instruct-2507"),
        ("qwen3-coder", "qwen3-coder-30b-a3b-instruct"),
        ("qwen3-next", "qwen3-next-80b-a3b-instruct"),
        ("QWEN3.5-35B", "qwen3.5-35b-a3b"),
        ("qwen3.6", "qwen3.6-35b-a3b"),
        ("  qwen3-235b-thinking ", "qwen3-235b-a22b-thinking-2507"),
    ],
)
def test_lookup_accepts_the_spellings_users_and_files_use(text: str, name: str) -> None:
    assert lookup(text).name == name


def test_lookup_of_an_unknown_name_lists_close_matches() -> None:
    with pytest.raises(errors.ModelNotFoundError) as info:
        lookup("qwen3-30b-a3c")
    assert "qwen3-30b-a3b" in info.value.message
    assert info.value.hint


def test_lookup_does_not_guess_a_bare_family_name() -> None:
    # "qwen3" could be any of a dozen checkpoints (and is a fine-tune's usual basename).
    with pytest.raises(errors.ModelNotFoundError):
        lookup("qwen3")


def test_specs_are_hashable_by_name() -> None:
    assert len({*CATALOG, *CATALOG}) == len(CATALOG)


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_shape_gives_the_published_total_parameters(spec: catalog.ModelSpec) -> None:
    counts = catalog.param_counts(spec.shape)
    assert counts.total / 1e9 == pytest.approx(spec.params_total, rel=0.02)


# The Qwen3 MoE cards give activated parameters with embeddings counted (30B-A3B: 3.3B);
# the shapes reproduce them within 2 %. The hybrids' cards give only the rounded label of the
# name ("A3B", "A10B", "A17B"), which no counting convention reproduces: Qwen3-Next-80B
# counts 3.87B with embeddings, 3.25B without; Qwen3.5-35B 3.45B and 2.44B. For those, the
# check is against catalog.md's own tensor arithmetic where it gives one (Next-80B: 3.9B)
# and otherwise that the label is the right order of magnitude.
_ACTIVE_FROM_ARITHMETIC = {
    "qwen3-30b-a3b": 3.35,
    "qwen3-235b-a22b": 22.2,
    "qwen3-coder-480b-a35b-instruct": 35.5,
    "qwen3-next-80b-a3b-instruct": 3.9,
}


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_shape_gives_the_published_active_parameters(spec: catalog.ModelSpec) -> None:
    active = catalog.param_counts(spec.shape).active / 1e9
    if not spec.shape.is_hybrid:
        assert active == pytest.approx(spec.params_active, rel=0.02)
    else:
        assert active == pytest.approx(spec.params_active, rel=0.3)
    if spec.name in _ACTIVE_FROM_ARITHMETIC:
        assert active == pytest.approx(_ACTIVE_FROM_ARITHMETIC[spec.name], rel=0.02)


def test_param_counts_split_experts_from_the_rest() -> None:
    # catalog.md §3.5: 30B-A3B has 1.54B parameters outside the routed experts.
    c = catalog.param_counts(_spec("qwen3-30b-a3b").shape)
    assert (c.total - c.routed_experts) / 1e9 == pytest.approx(1.54, rel=0.01)
    assert c.embeddings == 2 * 151_936 * 2048
    assert c.active == c.total - c.routed_experts + c.routed_experts * 8 // 128


# catalog.md §3.6: f16 KV bytes per token = 2 × attention layers × KV heads × head_dim × 2.
@pytest.mark.parametrize(
    ("name", "attention_layers", "kv_kib"),
    [
        ("qwen3-30b-a3b", 48, 96),
        ("qwen3-235b-a22b", 94, 188),
        ("qwen3-coder-480b-a35b-instruct", 62, 248),
        ("qwen3-next-80b-a3b-thinking", 12, 24),
        ("qwen3.5-35b-a3b", 10, 20),
        ("qwen3.6-35b-a3b", 10, 20),
        ("qwen3.5-122b-a10b", 12, 24),
        ("qwen3.5-397b-a17b", 15, 30),
    ],
)
def test_attention_layers_and_kv_size_per_token(
    name: str, attention_layers: int, kv_kib: int
) -> None:
    s = _spec(name).shape
    assert s.n_attention_layers == attention_layers
    assert 2 * s.n_attention_layers * s.n_head_kv * s.head_dim * 2 == kv_kib * 1024


def test_hybrid_layout_is_three_delta_net_layers_then_attention() -> None:
    s = _spec("qwen3.5-35b-a3b").shape
    assert s.attention_layers[:3] == (3, 7, 11)
    assert s.attention_layers[-1] == s.n_layer - 1


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_shape_fields_fit_the_architecture(spec: catalog.ModelSpec) -> None:
    s = spec.shape
    ssm = (s.ssm_state, s.ssm_groups, s.ssm_v_heads, s.ssm_conv_kernel)
    if s.is_hybrid:
        assert s.full_attention_interval == 4
        assert all(ssm) and s.shared_expert_ff > 0
    else:
        assert s.arch == "qwen3moe"
        assert s.full_attention_interval == 1 and ssm == (0, 0, 0, 0)
        assert s.shared_expert_ff == 0 and s.mtp_layers == 0
    assert 0 < s.n_expert_used < s.n_expert
    assert s.n_head % s.n_head_kv == 0
    assert s.n_ctx_native >= 32_768


def test_layout_uses_llama_cpp_names_and_shapes() -> None:
    # catalog.md §3.2, confirmed by a real 235B header: fused 3-D expert tensors, F32 router.
    layout = {t.name: t.shape for t in catalog.tensor_layout(_spec("qwen3-235b-a22b").shape)}
    assert layout["blk.0.ffn_gate_exps.weight"] == (4096, 1536, 128)
    assert layout["blk.0.ffn_up_exps.weight"] == (4096, 1536, 128)
    assert layout["blk.0.ffn_down_exps.weight"] == (1536, 4096, 128)
    assert layout["blk.0.ffn_gate_inp.weight"] == (4096, 128)
    assert layout["token_embd.weight"] == (4096, 151_936)
    assert "blk.93.ffn_down_exps.weight" in layout and "blk.94.attn_q.weight" not in layout


def test_mtp_block_only_when_asked() -> None:
    s = _spec("qwen3.5-35b-a3b").shape
    plain = {t.name for t in catalog.tensor_layout(s)}
    mtp = {t.name for t in catalog.tensor_layout(s, include_mtp=True)}
    assert not any(n.startswith("blk.40.") for n in plain)
    assert {"blk.40.ffn_down_exps.weight", "blk.40.nextn.eh_proj.weight"} <= mtp


# ------------------------------------------------------------------------------ modes, repos


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_presets_cover_exactly_the_modes_of_the_thinking_kind(spec: catalog.ModelSpec) -> None:
    assert set(spec.presets) == set(MODES_BY_KIND[spec.thinking])
    assert spec.modes == MODES_BY_KIND[spec.thinking]
    for p in spec.presets.values():
        assert p.temperature > 0  # the cards forbid greedy decoding in thinking mode
        assert 0 < p.top_p <= 1 and p.top_k > 0 and 0 <= p.min_p < 1


def test_presets_follow_the_model_cards() -> None:
    hybrid = _spec("qwen3-30b-a3b").presets
    assert (hybrid["think"].temperature, hybrid["think"].top_p) == (0.6, 0.95)
    assert (hybrid["direct"].temperature, hybrid["direct"].top_p) == (0.7, 0.8)
    assert _spec("qwen3.5-35b-a3b").presets["think"].temperature == 1.0
    assert _spec("qwen3.5-35b-a3b").presets["think"].presence_penalty == 1.5
    assert _spec("qwen3-coder-30b-a3b-instruct").presets["direct"].repeat_penalty == 1.05
    assert set(_spec("qwen3-30b-a3b-thinking-2507").presets) == {"think"}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("qwen3-30b-a3b", "hybrid"),
        ("qwen3-30b-a3b-instruct-2507", "direct"),
        ("qwen3-30b-a3b-thinking-2507", "thinking"),
        ("qwen3-coder-480b-a35b-instruct", "direct"),
        ("qwen3-next-80b-a3b-thinking", "thinking"),
        ("qwen3.6-35b-a3b", "hybrid"),
    ],
)
def test_thinking_kinds(name: str, kind: str) -> None:
    assert _spec(name).thinking == kind


def test_repos_look_like_owner_name_and_belong_to_one_model() -> None:
    seen: dict[str, str] = {}
    for s in CATALOG:
        assert s.repos, s.name
        for r in s.repos:
            assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*-GGUF", r), r
            assert seen.setdefault(r.lower(), s.name) == s.name, f"{r} listed twice"


def test_official_repos_come_first() -> None:
    for s in CATALOG:
        owners = [r.split("/")[0] for r in s.repos]
        if "Qwen" in owners:
            assert owners[0] == "Qwen", s.name


# ------------------------------------------------------------------------------ quants


def test_ladder_is_unique_and_canonically_spelled() -> None:
    assert len(set(QUANT_LADDER)) == len(QUANT_LADDER)
    assert all(catalog.normalize_quant(q) == q for q in QUANT_LADDER)


def test_ladder_order_follows_quality() -> None:
    order = [
        "BF16", "Q8_0", "Q6_K", "UD-Q5_K_XL", "Q5_K_M", "UD-Q4_K_XL", "Q4_K_M", "IQ4_XS",
        "Q3_K_M", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_XXS", "IQ1_S",
    ]  # fmt: skip
    ranks = [catalog.quant_rank(q) for q in order]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_quant_rank_is_case_insensitive_and_unknown_ranks_last() -> None:
    assert catalog.quant_rank("q4_k_m") == catalog.quant_rank("Q4_K_M")
    assert catalog.quant_rank("ud-q4_k_xl") == catalog.quant_rank("UD-Q4_K_XL")
    assert catalog.quant_rank("Q9_Z") == len(QUANT_LADDER)
    assert catalog.quant_rank("Q9_Z") > catalog.quant_rank("IQ1_S")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [("q4_k_m", "Q4_K_M"), ("ud-q4_k_xl", "UD-Q4_K_XL"), ("ud_q2_k_xl", "UD-Q2_K_XL"),
     (" bf16 ", "BF16"), ("fp16", "F16"), ("iq4_xs", "IQ4_XS")],
)  # fmt: skip
def test_normalize_quant(raw: str, canonical: str) -> None:
    assert catalog.normalize_quant(raw) == canonical


def test_normalize_quant_refuses_an_empty_name() -> None:
    with pytest.raises(errors.UsageError):
        catalog.normalize_quant("  ")


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("Qwen3-30B-A3B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("Qwen3-30B-A3B-Instruct-2507-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("Q4_K_M/Qwen3-235B-A22B-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("UD-Q2_K_XL/Qwen3-Coder-480B-A35B-Instruct-UD-Q2_K_XL-00004-of-00004.gguf", "UD-Q2_K_XL"),
        ("BF16/Qwen3-30B-A3B-Instruct-2507-BF16-00001-of-00002.gguf", "BF16"),
        ("Qwen_Qwen3-30B-A3B-Q6_K_L.gguf", "Q6_K_L"),
        ("Qwen_Qwen3.5-122B-A10B-Q4_K_M/Qwen_Qwen3.5-122B-A10B-Q4_K_M-00001-of-00002.gguf",
         "Q4_K_M"),
        ("Qwen3-30B-A3B-q8_0.gguf", "Q8_0"),
        ("Qwen3.5-35B-A3B-IQ4_XS.gguf", "IQ4_XS"),
        ("Qwen3.5-35B-A3B-MXFP4_MOE.gguf", "MXFP4_MOE"),
        ("mmproj-F16.gguf", "F16"),
        # A quant named only by its folder.
        ("Q8_0/Qwen3-235B-A22B-00001-of-00009.gguf", "Q8_0"),
        # No quant anywhere: never "A3B", "Qwen3" or a shard number.
        ("Qwen3-Next-80B-A3B-Thinking-00001-of-00004.gguf", None),
        ("Qwen3-30B-A3B.gguf", None),
        ("model.gguf", None),
    ],
)  # fmt: skip
def test_parse_quant_from_filename(filename: str, quant: str | None) -> None:
    assert names.parse_quant(filename) == quant


def test_every_ladder_quant_parses_back_from_a_file_name() -> None:
    for q in QUANT_LADDER:
        assert names.parse_quant(f"Qwen3-30B-A3B-{q}.gguf") == q
        assert names.parse_quant(f"x/Qwen3-30B-A3B-{q.lower()}.gguf") == q
