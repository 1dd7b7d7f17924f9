"""A quant's recipe: which ggml type each tensor gets, and the size estimate built on it.

Contract: pure functions over a catalog shape's tensor layout. llama.cpp's own mixes (Q4_K_M,
IQ4_XS, Q3_K_M, …) follow its `llama_tensor_get_type` (src/llama-quant.cpp) rule by rule,
counters included, and its rule for which tensors are quantized at all; bartowski's `_L`/`_XL`
and unsloth's `UD-` quants are approximations on top (see RECIPES). Block sizes come from the
`gguf` package's tables. `estimate(spec, quant)` turns the result into a `GGUFInfo` marked
`estimated=True` (brought to the published size where the catalog has one, by scaling the
routed experts), so a catalog model can be planned before any byte is downloaded; nothing
here reads a file or knows about devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from qwenrun import errors
from qwenrun.catalog import (
    NGRAM_TABLE,
    ModelShape,
    ModelSpec,
    TensorShape,
    normalize_quant,
    tensor_layout,
)
from qwenrun.engine.loadconfig import layer_of

if TYPE_CHECKING:
    from qwenrun.hub.header import GGUFInfo, TensorInfo

# The `gguf` package (and numpy under it) is imported only when an estimate is made: planning
# from cached facts (`factcache`) must not pay ~0.2 s for it.

_EMBD_OUTPUT = ("token_embd.weight", "output.weight")

# Published GGUFs are made with an importance matrix (unsloth, bartowski), so llama.cpp's
# `has_imatrix` is assumed true where it changes a rule.

# llama.cpp ftype (without MOSTLY_) → the default ggml type of its quantized tensors.
_FTYPE_DEFAULT: Mapping[str, str] = MappingProxyType(
    {
        "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0",
        "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
        "MXFP4_MOE": "MXFP4",
        "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
        "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
        "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
        "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS",
        "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S",
        "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    }
)  # fmt: skip
_LOW_BIT = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"})


@dataclass(frozen=True)
class QuantRecipe:
    """How a published quant types its tensors.

    `ftype`: the llama.cpp mix whose rules apply. Then, forced over it: `embd_output` on
    token_embd and output (bartowski's `_L`/`_XL`: Q8_0); `dense` on every other quantized
    tensor outside the routed experts (attention, DeltaNet, shared experts); `down_exps` on
    the routed experts' down projections; `table` on Qwen3.8-Flash-Next's n-gram table
    (None: llama.cpp's rule, which treats it as a token embedding).
    """

    ftype: str
    embd_output: str | None = None
    dense: str | None = None
    down_exps: str | None = None
    table: str | None = None


def _ud(ftype: str, down_exps: str | None = None) -> QuantRecipe:
    return QuantRecipe(ftype, embd_output="Q8_0", dense="Q8_0", down_exps=down_exps)


def _q8_dense(ftype: str) -> QuantRecipe:
    return QuantRecipe(ftype, embd_output="Q8_0", dense="Q8_0")


# unsloth's dynamic "UD-" quants choose types per tensor and per layer from their own
# measurements and change between uploads, so no rule reproduces them. The approximation,
# calibrated on the published sizes in reference/catalog.md §2.2 (tests/test_header.py
# holds the table and the error of each): the routed experts as the llama.cpp mix of the
# same class, everything else at Q8_0 (the parsed Qwen3.6 UD-Q4_K_XL header shows attention,
# DeltaNet, shared experts, embeddings and output all at Q8_0). Below 3 bits unsloth keeps
# the experts' down projections about one class higher (480B UD-IQ1_M: 139.7 GiB, where a
# plain IQ1_M mix gives 109).
RECIPES: Mapping[str, QuantRecipe] = MappingProxyType(
    {
        **{f: QuantRecipe(f) for f in _FTYPE_DEFAULT},
        "Q6_K_L": QuantRecipe("Q6_K", embd_output="Q8_0"),
        "Q5_K_L": QuantRecipe("Q5_K_M", embd_output="Q8_0"),
        "Q4_K_L": QuantRecipe("Q4_K_M", embd_output="Q8_0"),
        "Q3_K_XL": QuantRecipe("Q3_K_L", embd_output="Q8_0"),
        "Q2_K_L": QuantRecipe("Q2_K", embd_output="Q8_0"),
        "UD-Q8_K_XL": _ud("Q8_0"),
        "UD-Q6_K_XL": _ud("Q6_K"),
        "UD-Q5_K_XL": _ud("Q5_K_M"),
        "UD-Q4_K_XL": _ud("Q4_K_M"),
        "UD-IQ4_XS": _ud("IQ4_XS"),
        "UD-Q3_K_XL": _ud("Q3_K_M"),
        "UD-IQ3_XXS": _ud("IQ3_XXS"),
        "UD-Q2_K_XL": _ud("Q2_K"),
        "UD-IQ2_M": _ud("IQ2_M", down_exps="Q3_K"),
        "UD-IQ2_XXS": _ud("IQ2_XXS", down_exps="IQ3_XXS"),
        "UD-IQ1_M": _ud("IQ1_M", down_exps="Q3_K"),
        "UD-IQ1_S": _ud("IQ1_S", down_exps="IQ3_XXS"),
    }
)

# Per-architecture corrections, from the same published sizes:
# - qwen3moe (unsloth's 2025 uploads of Qwen3-30B/235B/480B): the UD 3-5-bit quants are
#   lighter than the newer ones, close to llama.cpp's own mix one step down, dense parts
#   included (30B UD-Q4_K_XL 16.5 GiB, below Q4_K_M's 17.3; UD-Q3_K_XL 12.9, below Q3_K_M).
# - qwen35moe (unsloth's Qwen3.5/3.6): the 4-6-bit K mixes keep the dense parts at Q8_0 like
#   the UD quants (Q4_K_M 20.5 GiB next to UD-Q4_K_XL's 20.7), and UD-Q3_K_XL keeps them
#   at llama.cpp's types.
ARCH_RECIPES: Mapping[str, Mapping[str, QuantRecipe]] = MappingProxyType(
    {
        "qwen3moe": MappingProxyType(
            {
                "UD-Q5_K_XL": QuantRecipe("Q5_K_M"),
                "UD-Q4_K_XL": QuantRecipe("Q4_K_S"),
                "UD-Q3_K_XL": QuantRecipe("Q3_K_S"),
            }
        ),
        "qwen35moe": MappingProxyType(
            {
                "Q6_K": _q8_dense("Q6_K"),
                "Q5_K_M": _q8_dense("Q5_K_M"),
                "Q4_K_M": _q8_dense("Q4_K_M"),
                "UD-Q3_K_XL": QuantRecipe("Q3_K_M", embd_output="Q8_0"),
            }
        ),
        # qwen4exp (unsloth's Qwen3.8-Flash-Next, qwen38.md §2): the n-gram table at IQ4_NL
        # up to the 4-bit quants ("1-bit uses 4-bit for the Ngram/PLE") and Q8_0 from 5-bit
        # on; the experts' down projections (rows of 640, no 256-blocks) at 32-block types.
        # From the published splits: UD-IQ4_XS is IQ3_S gate/up with IQ4_NL down, UD-Q4_K_XL
        # Q4_K with Q5_1 down, UD-Q5_K_XL Q5_K with Q8_0 down, UD-Q3_K_XL's down IQ4_NL.
        "qwen4exp": MappingProxyType(
            {
                **{
                    q: replace(RECIPES[q], table="IQ4_NL")
                    for q in ("UD-IQ1_S", "UD-IQ1_M", "UD-IQ2_XXS", "UD-IQ2_M", "UD-Q2_K_XL")
                },
                "UD-IQ3_XXS": replace(RECIPES["UD-IQ3_XXS"], table="IQ4_NL"),
                "UD-Q3_K_XL": replace(_ud("Q3_K_M", down_exps="IQ4_NL"), table="IQ4_NL"),
                "UD-IQ4_XS": replace(_ud("IQ3_S"), table="IQ4_NL"),
                "UD-Q4_K_XL": replace(_ud("Q4_K_M", down_exps="Q5_1"), table="IQ4_NL"),
                "UD-Q5_K_XL": replace(_ud("Q5_K_M", down_exps="Q8_0"), table="Q8_0"),
                "UD-Q6_K_XL": replace(_ud("Q6_K"), table="Q8_0"),
                "UD-Q8_K_XL": replace(_ud("Q8_0"), table="Q8_0"),
            }
        ),
    }
)


def _quantized(t: TensorShape) -> bool:
    """llama.cpp quantizes 2-D+ `*.weight` tensors except norms, the router, the conv and
    the indexer's projections (tiny: `tensor_allows_quantization`)."""
    name = t.name
    return (
        name.endswith("weight")
        and len(t.shape) >= 2
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "ssm_conv1d.weight" not in name
        and "indexer.k_proj.weight" not in name
        and "indexer.q_proj.weight" not in name
    )


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block_of(name: str) -> int:
    return layer_of(name) or 0


class _TypeChooser:
    """llama.cpp's `llama_tensor_get_type` for one model and ftype, with its counters."""

    def __init__(self, ftype: str, layout: Sequence[TensorShape], s: ModelShape) -> None:
        self.ftype = ftype
        self.default = _FTYPE_DEFAULT[ftype]
        self.n_layer = max((_block_of(t.name) for t in layout), default=0) + 1
        self.n_gqa = s.n_head // max(1, s.n_head_kv)
        self.n_expert = s.n_expert
        self.n_attention_wv = sum(
            1 for t in layout if "attn_v.weight" in t.name or "attn_qkv.weight" in t.name
        )
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def choose(self, t: TensorShape) -> str:
        new = self._rule(t)
        return _fallback(new, t.shape[0])

    def _rule(self, t: TensorShape) -> str:
        f, name, new = self.ftype, t.name, self.default
        if name == "output.weight":
            if f == "MXFP4_MOE" or t.shape[0] % _block(new):
                return "Q8_0"
            if f in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                return "Q5_K"
            return new if new == "Q8_0" else "Q6_K"
        if f == "MXFP4_MOE":
            return "MXFP4" if len(t.shape) > 2 and t.shape[2] > 1 else "Q8_0"
        if name in ("token_embd.weight", NGRAM_TABLE):  # llama.cpp: both TOKEN_EMBD
            if f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return "Q2_K"
            if f in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return "IQ3_S"
            return new
        if f in _LOW_BIT:
            return self._low_bit(name, new)
        if "attn_v.weight" in name:
            return self._attn_v(new)
        if "attn_k.weight" in name:
            return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(f, new)
        if "attn_q.weight" in name:
            return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(f, new)
        if "ffn_down" in name:
            return self._ffn_down(_block_of(name), new)
        if "attn_output.weight" in name:
            return self._attn_output(new)
        if "attn_qkv.weight" in name:
            if f in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
                return "Q4_K"
            return {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(f, new)
        if ("ffn_gate" in name or "ffn_up" in name) and f == "IQ3_XS":
            i = _block_of(name)
            if self.n_layer // 8 <= i < 7 * self.n_layer // 8:
                return "IQ3_XXS"
        return new

    def _low_bit(self, name: str, new: str) -> str:
        f = self.ftype
        if "attn_v.weight" in name:
            self.i_attention_wv += 1
            if self.n_gqa >= 4 or self.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
        if self.n_expert == 8 and "attn_k.weight" in name:
            return "Q4_K"
        if "ffn_down" in name:
            i = self.i_ffn_down
            self.i_ffn_down += 1
            if i < self.n_layer // 8:
                return "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
            return new
        if "attn_output.weight" in name:
            if self.n_expert == 8:
                return "Q5_K"
            if f in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS"
            if f in ("IQ2_S", "IQ2_M"):
                return "IQ3_S"
        return new

    def _attn_v(self, new: str) -> str:
        f, i, n = self.ftype, self.i_attention_wv, self.n_attention_wv
        self.i_attention_wv += 1
        if self.n_expert == 8:
            return "Q8_0"
        gqa4 = self.n_gqa >= 4
        if f == "Q2_K":
            return "Q4_K" if gqa4 else "Q3_K"
        if f == "Q2_K_S" and gqa4:
            return "Q4_K"
        if f == "IQ3_XXS":
            return "Q4_K" if gqa4 else "IQ3_XXS"
        if f in ("IQ3_XS", "IQ3_S") and gqa4:
            return "Q4_K"
        if f == "IQ3_M":
            return "Q4_K"
        if f == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if f == "Q3_K_L":
            return "Q5_K"
        if f in ("IQ4_NL", "IQ4_XS") and gqa4:
            return "Q5_K"
        if f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if f == "Q4_K_S" and i < 4:
            return "Q5_K"
        return new

    def _ffn_down(self, i: int, new: str) -> str:
        f, n = self.ftype, self.n_layer
        self.i_ffn_down += 1
        if f == "Q2_K":
            return "Q3_K"
        if f == "Q2_K_S":
            return "Q4_K" if i < n // 8 else new
        if f == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if f == "IQ3_M" and (i < n // 8 or (self.n_expert == 8 and _use_more_bits(i, n))):
            return "Q4_K"
        if f == "Q3_K_L":
            return "Q5_K"
        if f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if f == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if f in ("Q4_0", "Q5_0") and i < n // 8:
            return "Q4_1" if f == "Q4_0" else "Q5_1"
        return new

    def _attn_output(self, new: str) -> str:
        f = self.ftype
        if self.n_expert == 8:
            eight = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S")
            return "Q5_K" if f in (*eight, "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS") else new
        return {
            "Q2_K": "Q3_K",
            "IQ3_XXS": "IQ3_S",
            "Q3_K_M": "Q4_K",
            "Q3_K_L": "Q5_K",
            "IQ3_M": "Q4_K",
        }.get(f, new)


@functools.lru_cache(maxsize=64)
def _block(type_name: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


# llama.cpp's fallback when a row is not a whole number of blocks of the chosen type.
_FALLBACK: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "Q2_K", "Q3_K",
             "IQ4_XS"),
            "IQ4_NL",
        ),
        "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    }
)  # fmt: skip


def _fallback(type_name: str, ne0: int) -> str:
    if ne0 % _block(type_name) == 0:
        return type_name
    alt = _FALLBACK.get(type_name, "F16")
    return alt if ne0 % _block(alt) == 0 else "F16"


def recipe_for(quant: str, arch: str | None = None) -> QuantRecipe:
    """The recipe of a quant name (any case) for `arch`; `UsageError` for an unknown quant."""
    name = normalize_quant(quant)
    recipe = ARCH_RECIPES.get(arch or "", {}).get(name) or RECIPES.get(name)
    if recipe is None:
        raise errors.UsageError(
            f"no size recipe for quant {quant!r}",
            hint="known quants: " + ", ".join(sorted(RECIPES)),
        )
    return recipe


def has_recipe(quant: str, arch: str | None = None) -> bool:
    """Whether `estimate` can size this quant (without building anything)."""
    try:
        recipe_for(quant, arch)
    except errors.UsageError:
        return False
    return True


def _forced(recipe: QuantRecipe, t: TensorShape) -> str | None:
    if t.name == NGRAM_TABLE:
        return recipe.table
    if t.name in _EMBD_OUTPUT:
        return recipe.embd_output
    if not t.is_routed_expert:
        return recipe.dense
    return recipe.down_exps if ".ffn_down_" in t.name else None


def tensor_types(shape: ModelShape, quant: str, layout: Sequence[TensorShape]) -> list[str]:
    """The ggml type name of each tensor of `layout` (in order) at `quant`."""
    recipe = recipe_for(quant, shape.arch)
    ftype = recipe.ftype
    # F32/F16/BF16 are not "quantized" types: llama.cpp applies no rules, one type for all.
    plain = ftype in ("F32", "F16", "BF16")
    chooser = _TypeChooser(ftype, layout, shape)
    out = []
    for t in layout:
        if not _quantized(t):
            out.append("F32")  # what the converter writes for norms, router, conv, ssm_a
            continue
        chosen = _FTYPE_DEFAULT[ftype] if plain else chooser.choose(t)  # advances counters
        forced = _forced(recipe, t)
        out.append(_fallback(forced, t.shape[0]) if forced else chosen)
    return out


# ------------------------------------------------------------------------------ estimate


def estimate(spec: ModelSpec, quant: str, *, include_mtp: bool = False) -> GGUFInfo:
    """The tensors of `spec` at `quant`, typed by the quant's recipe (estimated=True).

    llama.cpp's own mixes (Q4_K_M, IQ4_XS, …) follow its rules; bartowski's `_L` and
    unsloth's `UD-` quants are approximations (RECIPES). A quant the catalog has a published
    size for (`ModelSpec.published`: models whose headers cannot be read here) is brought to
    that size by scaling its routed experts, the part unsloth's dynamic quants vary most.
    `include_mtp` adds the MTP block that the `-MTP-GGUF` repos carry. An unknown quant is a
    `UsageError`.
    """
    import gguf

    from qwenrun.hub.header import GGUFInfo, TensorInfo, tensor_bytes

    name = normalize_quant(quant)
    layout = tensor_layout(spec.shape, include_mtp=include_mtp)
    types = tensor_types(spec.shape, name, layout)
    tensors = tuple(
        TensorInfo(
            t.name, ty, t.shape, tensor_bytes(gguf.GGMLQuantizationType[ty], t.shape, t.name)
        )
        for t, ty in zip(layout, types, strict=True)
    )
    published = spec.published.get(name)
    if published and not include_mtp:
        tensors = _scaled_to(tensors, published)
    return GGUFInfo(
        arch=spec.shape.arch,
        metadata=MappingProxyType(_estimated_metadata(spec, name, include_mtp)),
        tensors=tensors,
        files=(),
        estimated=True,
        array_lengths=MappingProxyType({"tokenizer.ggml.tokens": spec.shape.vocab_size}),
    )


def _scaled_to(tensors: tuple[TensorInfo, ...], total: int) -> tuple[TensorInfo, ...]:
    """The routed experts' bytes scaled so that all the tensors add up to `total`."""
    experts = sum(t.n_bytes for t in tensors if t.is_routed_expert)
    rest = sum(t.n_bytes for t in tensors) - experts
    if experts <= 0 or total <= rest:
        return tensors
    factor = (total - rest) / experts
    return tuple(
        replace(t, n_bytes=round(t.n_bytes * factor)) if t.is_routed_expert else t for t in tensors
    )


def _estimated_metadata(spec: ModelSpec, quant: str, include_mtp: bool) -> dict[str, object]:
    s, a = spec.shape, spec.shape.arch
    mtp = s.mtp_layers if include_mtp else 0
    meta: dict[str, object] = {
        "general.architecture": a,
        "general.name": spec.display,
        "qwenrun.quant": quant,
        f"{a}.block_count": s.n_layer + mtp,
        f"{a}.context_length": s.n_ctx_native,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.vocab_size": s.vocab_size,
        f"{a}.attention.head_count": s.n_head,
        f"{a}.attention.head_count_kv": s.n_head_kv,
        f"{a}.attention.key_length": s.head_dim,
        f"{a}.attention.value_length": s.head_dim,
        f"{a}.expert_count": s.n_expert,
        f"{a}.expert_used_count": s.n_expert_used,
        f"{a}.expert_feed_forward_length": s.expert_ff,
    }
    import gguf

    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{quant}", None)
    if ftype is not None:
        meta["general.file_type"] = int(ftype)
    if s.shared_expert_ff:
        meta[f"{a}.expert_shared_feed_forward_length"] = s.shared_expert_ff
    if s.is_hybrid:
        meta |= {
            f"{a}.full_attention_interval": s.full_attention_interval,
            f"{a}.nextn_predict_layers": mtp,
            f"{a}.ssm.state_size": s.ssm_state,
            f"{a}.ssm.group_count": s.ssm_groups,
            f"{a}.ssm.time_step_rank": s.ssm_v_heads,
            f"{a}.ssm.inner_size": s.ssm_state * s.ssm_v_heads,
            f"{a}.ssm.conv_kernel": s.ssm_conv_kernel,
        }
    if s.hc:  # Qwen3.8-Flash-Next: what the planner reads of its keys (qwen38.md §3.2)
        meta |= {
            f"{a}.hyper_connection.count": s.hc,
            f"{a}.hyper_connection.low_rank": s.hc_rank,
            f"{a}.attention.indexer.head_count": s.indexer_heads,
            f"{a}.attention.indexer.key_length": s.indexer_dim,
            f"{a}.attention.indexer.top_k": s.indexer_top_k,
            f"{a}.attention.compress_ratios": [s.compress_ratio] * s.n_layer,
            f"{a}.ple.layers": [s.ple_layer],
            f"{a}.ple.ngram_size": s.ple_ngram,
            f"{a}.ple.heads_per_ngram": s.ple_heads_per_ngram,
            f"{a}.ple.conv_kernel": s.ple_conv_kernel,
            f"{a}.embedding_length_per_layer_input": s.ple_row,
        }
    return meta
