"""What the planner needs to know about one model, condensed from its GGUF header.

Contract: `ModelFacts.from_info(info)` reads a `GGUFInfo` (local: exact bytes; catalog
estimate: computed bytes) once and keeps per-layer sums: dense and routed-expert bytes, the
routed-expert tensors of each layer, attention and recurrent layers, KV row sizes, the
recurrent state's size, parameter counts. Pure arithmetic, no I/O. What llama.cpp allocates
for a placement is `costs.py`'s business; how fast it runs, `speed.py`'s.

Facts of llama.cpp's loader this rests on (the commit llama-cpp-python 0.3.36 vendors):
MTP/NextN blocks (`nextn_predict_layers`, the last blocks) are skipped unless asked for;
hybrids (Qwen3-Next, Qwen3.5/3.6, Qwen3.8-Flash-Next) keep a KV cache only in the layers with
`(i+1) % full_attention_interval == 0`, and per other layer a recurrent state of
`(d_conv-1)·(d_inner + 2·groups·d_state)` conv values plus `d_state·d_inner` state values
(f32, one sequence).

Qwen3.8-Flash-Next (`qwen4exp`, src/models/qwen4exp.cpp, llama-memory-hybrid-idx.cpp,
llama-memory-recurrent.cpp) adds: an indexer cache beside the KV cache, always allocated, one
key row of `attention.indexer.key_length` per cell and attention layer in the K type; one more
recurrent row on its n-gram layer, `(ple.conv_kernel-1)·ple.ngram_size·hc·n_embd` f32 values;
and the n-gram table `per_layer_token_embd` (an input tensor, never on a GPU), kept apart from
the weights (`table_bytes`) because it may stay in the file and be read a few rows per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from qwenrun.catalog import NGRAM_TABLE  # Qwen3.8-Flash-Next's n-gram hash table
from qwenrun.engine.loadconfig import KV_TYPES, is_routed_expert

if TYPE_CHECKING:
    from qwenrun.hub.header import GGUFInfo, TensorInfo

HYBRID_ARCHES = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp"})
CTX_PAD = 256  # llama_context rounds n_ctx up to a multiple of 256


def pad_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def kv_row_bytes(kv_type: str, n_elements: int) -> int:
    return KV_TYPES[kv_type.lower()].row_bytes(n_elements)


# --------------------------------------------------------------------------------------
# Facts about one GGUF


class ExpertTensor(NamedTuple):
    name: str
    n_bytes: int


# (ggml type, bytes, rows = ne1, routed expert, row width = ne0)
TensorType = tuple[str, int, int, bool, int]


@dataclass(frozen=True)
class ModelFacts:
    """Everything the memory and speed model needs, summed per layer."""

    arch: str
    name: str
    n_layer_all: int  # block_count, MTP blocks included
    n_layer: int  # trunk blocks (what runs)
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    n_vocab: int
    ctx_native: int
    attn_layers: tuple[int, ...]
    recr_layers: tuple[int, ...]
    rs_bytes_per_layer: int
    ssm_conv_dim: int
    token_embd_bytes: int
    output_bytes: int  # output.weight (or the tied copy of token_embd), output_norm, extras
    output_tied: bool
    dense_bytes: tuple[int, ...]  # per trunk layer: everything but routed experts
    expert_bytes: tuple[int, ...]  # per trunk layer: routed experts
    expert_tensors: tuple[tuple[ExpertTensor, ...], ...]  # per trunk layer
    dense_params: int  # elements read per token, for FLOPs: all but routed experts, embd
    expert_params: int  # elements of all routed experts
    skipped_bytes: int  # MTP blocks llama.cpp does not load
    has_shared_expert: bool
    file_bytes: int
    # per trunk layer, tensors as (ggml type, bytes, rows, routed expert, row width) for the
    # sums of CPU weight copies (repack, AMX); `output_types` the output layer's matmuls
    layer_types: tuple[tuple[TensorType, ...], ...]
    # Qwen3.8-Flash-Next (0 elsewhere): the n-gram table, never in `weight_bytes`; the
    # indexer cache's key row per cell and attention layer; the indexer's top-k width when
    # attention is sparse (QSA); hyper-connection streams; the n-gram layer and its extra
    # recurrent row.
    table_bytes: int = 0
    indexer_dim: int = 0
    qsa_width: int = 0
    hc: int = 0
    ple_layer: int = -1
    ple_rs_bytes: int = 0
    # bytes by what the tensors do (`WEIGHT_CLASSES` order), all loaded tensors and the table
    weight_classes: tuple[tuple[str, int], ...] = ()
    output_types: tuple[TensorType, ...] = ()

    @functools.cached_property
    def sums(self) -> _Sums:
        """Suffix sums over layers, computed once (cached on the frozen instance)."""
        return _sums(self)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recr_layers)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and any(self.expert_bytes)

    @property
    def total_expert_bytes(self) -> int:
        return sum(self.expert_bytes)

    @property
    def total_dense_bytes(self) -> int:
        return sum(self.dense_bytes)

    @property
    def weight_bytes(self) -> int:
        """Bytes llama.cpp loads (file tensors minus skipped MTP blocks), the n-gram table
        aside (`table_bytes`: it may be read from the file instead)."""
        return (
            self.token_embd_bytes
            + self.output_bytes
            + self.total_dense_bytes
            + (self.total_expert_bytes)
        )

    @property
    def active_fraction(self) -> float:
        """Share of each routed-expert tensor one token reads."""
        if self.n_expert <= 0:
            return 1.0
        return min(1.0, self.n_expert_used / self.n_expert)

    def kv_bytes_per_layer(self, n_ctx: int, kv_type: str) -> int:
        """K and V rows of every cell of one attention layer, and its indexer key row."""
        cells = pad_ctx(n_ctx)
        k = kv_row_bytes(kv_type, self.head_dim_k * self.n_head_kv)
        v = kv_row_bytes(kv_type, self.head_dim_v * self.n_head_kv)
        idx = kv_row_bytes(kv_type, self.indexer_dim) if self.indexer_dim else 0
        return cells * (k + v + idx)

    def kv_bytes(self, n_ctx: int, kv_type: str) -> int:
        return len(self.attn_layers) * self.kv_bytes_per_layer(n_ctx, kv_type)

    @property
    def rs_bytes(self) -> int:
        return len(self.recr_layers) * self.rs_bytes_per_layer + self.ple_rs_bytes

    def rs_bytes_of(self, layers: range) -> int:
        """The recurrent state of the trunk layers in `layers` (the n-gram row included), from
        the cached sums: the search prices it for every layout it tries."""
        n = range_sum(self.sums.recr_suffix, layers) * self.rs_bytes_per_layer
        return n + (self.ple_rs_bytes if self.ple_layer in layers else 0)

    @property
    def has_table(self) -> bool:
        return self.table_bytes > 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples), for the on-disk cache of catalog facts."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["expert_tensors"] = [
            [(t.name, t.n_bytes) for t in layer] for layer in self.expert_tensors
        ]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFacts:
        """The inverse of `to_json`; `KeyError`/`TypeError`/`ValueError` on a foreign value."""
        values = dict(data)
        # The cache is ours (stamped): no per-value checks, only the shapes put back.
        make = ExpertTensor._make
        values["expert_tensors"] = tuple(
            tuple(map(make, layer)) for layer in data["expert_tensors"]
        )
        values["layer_types"] = tuple(tuple(map(tuple, layer)) for layer in data["layer_types"])
        values["output_types"] = tuple(map(tuple, data["output_types"]))
        values["weight_classes"] = tuple(tuple(c) for c in data["weight_classes"])
        for key in ("attn_layers", "recr_layers", "dense_bytes", "expert_bytes"):
            values[key] = tuple(data[key])
        return cls(**values)

    @classmethod
    def from_info(cls, info: GGUFInfo, name: str | None = None) -> ModelFacts:
        return _facts(info, name)


def _meta_int(info: GGUFInfo, key: str, default: int = 0) -> int:
    value: Any = info.get(key, None)
    if isinstance(value, list | tuple):
        # per-layer arrays (head_count_kv on some models): the largest is what is allocated
        value = max((int(v) for v in value), default=default)
    if value is None:
        return default
    return int(value)


def _n_elements(t: TensorInfo) -> int:
    return math.prod(t.shape) if t.shape else 0


# What a tensor does, for the plan's "weights by class" (a plan shows the non-zero ones).
WEIGHT_CLASSES = (
    "routed experts",
    "shared experts",
    "router",
    "attention",
    "indexer",
    "deltanet",
    "hyper-connections",
    "n-gram module",
    "norms",
    "embeddings",
    "output",
    "n-gram table",
    "other",
)


def weight_class(name: str, recurrent_layer: bool = False) -> str:
    """The class of one tensor by llama.cpp's name (`recurrent_layer`: its block is a Gated
    DeltaNet one, whose `attn_qkv` and `attn_gate` are the DeltaNet's projections)."""
    part = name.split(".")[2] if name.startswith("blk.") and name.count(".") >= 2 else name
    if name == NGRAM_TABLE:
        return "n-gram table"
    if name.startswith("token_embd"):
        return "embeddings"
    if name.startswith("output"):
        return "output"
    if is_routed_expert(name):
        return "routed experts"
    if "_shexp" in part:
        return "shared experts"
    if part == "ffn_gate_inp":
        return "router"
    if part.startswith("hc_"):
        return "hyper-connections"
    if part == "indexer":
        return "indexer"
    if part.startswith("ple_"):
        return "n-gram module"
    if part.startswith("ssm_") or (recurrent_layer and part in ("attn_qkv", "attn_gate")):
        return "deltanet"
    if part.endswith("norm") and not part.startswith(("attn_q", "attn_k")):
        return "norms"  # attn_norm, post_attention_norm, ffn_norm
    if part.startswith("attn_"):
        return "attention"
    return "other"


def _facts(info: GGUFInfo, name: str | None) -> ModelFacts:
    arch = info.arch
    n_layer_all = _meta_int(info, "block_count", info.n_layer)
    nextn = _meta_int(info, "nextn_predict_layers", 0)
    n_layer = max(0, n_layer_all - nextn)
    n_embd = _meta_int(info, "embedding_length")
    n_head = _meta_int(info, "attention.head_count", 1) or 1
    n_head_kv = _meta_int(info, "attention.head_count_kv", n_head) or n_head
    default_hd = n_embd // n_head if n_head else 0
    hd_k = _meta_int(info, "attention.key_length", default_hd) or default_hd
    hd_v = _meta_int(info, "attention.value_length", hd_k) or hd_k

    by_name = {t.name: t for t in info.tensors}
    embd = by_name.get("token_embd.weight")
    n_vocab = _meta_int(info, "vocab_size", 0)
    if embd is not None and len(embd.shape) >= 2:
        n_vocab = int(embd.shape[1])

    attn, recr = _layer_kinds(info, arch, n_layer)
    d_conv = _meta_int(info, "ssm.conv_kernel")
    d_inner = _meta_int(info, "ssm.inner_size")
    d_state = _meta_int(info, "ssm.state_size")
    groups = _meta_int(info, "ssm.group_count")
    conv_dim = d_inner + 2 * groups * d_state
    rs_per_layer = ((max(0, d_conv - 1)) * conv_dim + d_state * d_inner) * 4 if recr else 0

    dense = [0] * n_layer
    experts = [0] * n_layer
    expert_lists: list[list[ExpertTensor]] = [[] for _ in range(n_layer)]
    types: list[list[TensorType]] = [[] for _ in range(n_layer)]
    output_types: list[TensorType] = []
    token_embd_bytes = output_bytes = skipped = table_bytes = 0
    dense_params = expert_params = 0
    classes = dict.fromkeys(WEIGHT_CLASSES, 0)
    recr_set = set(recr)
    for t in info.tensors:
        layer = t.layer
        rows = int(t.shape[1]) if len(t.shape) >= 2 else 1
        typed = (t.ggml_type.upper(), t.n_bytes, rows, t.is_routed_expert, int(t.shape[0]))
        if layer is None or layer < n_layer:
            classes[weight_class(t.name, layer in recr_set)] += t.n_bytes
        if layer is None:
            if t.name == NGRAM_TABLE:
                table_bytes += t.n_bytes  # a few rows per token: not dense work
            elif t.name.startswith("token_embd"):
                token_embd_bytes += t.n_bytes
            else:
                output_bytes += t.n_bytes
                dense_params += _n_elements(t)
                if rows > 1 and "norm" not in t.name:  # output.weight, the HC projections
                    output_types.append(typed)
            continue
        if layer >= n_layer:
            skipped += t.n_bytes
            continue
        types[layer].append(typed)
        if t.is_routed_expert:
            experts[layer] += t.n_bytes
            expert_lists[layer].append(ExpertTensor(t.name, t.n_bytes))
            expert_params += _n_elements(t)
        else:
            dense[layer] += t.n_bytes
            dense_params += _n_elements(t)
    tied = "output.weight" not in by_name
    if tied and embd is not None:
        output_bytes += embd.n_bytes  # TENSOR_DUPLICATED onto the output device
        dense_params += _n_elements(embd)
    hc = _meta_int(info, "hyper_connection.count")
    ple_layer = _meta_int(info, "ple.layers", -1) if table_bytes else -1
    ple_rows = (_meta_int(info, "ple.conv_kernel") - 1) * _meta_int(info, "ple.ngram_size")
    ple_rs = max(0, ple_rows) * max(1, hc) * n_embd * 4 if 0 <= ple_layer < n_layer else 0

    return ModelFacts(
        arch=arch,
        name=name or str(info.get("general.name", None) or arch),
        n_layer_all=n_layer_all,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=hd_k,
        head_dim_v=hd_v,
        n_expert=_meta_int(info, "expert_count"),
        n_expert_used=_meta_int(info, "expert_used_count"),
        expert_ff=_meta_int(info, "expert_feed_forward_length"),
        n_vocab=n_vocab,
        ctx_native=_meta_int(info, "context_length", 0),
        attn_layers=attn,
        recr_layers=recr,
        rs_bytes_per_layer=rs_per_layer,
        ssm_conv_dim=conv_dim,
        token_embd_bytes=token_embd_bytes,
        output_bytes=output_bytes,
        output_tied=tied,
        dense_bytes=tuple(dense),
        expert_bytes=tuple(experts),
        expert_tensors=tuple(tuple(x) for x in expert_lists),
        dense_params=dense_params,
        expert_params=expert_params,
        skipped_bytes=skipped,
        has_shared_expert=any("shexp" in t.name for t in info.tensors),
        file_bytes=sum(t.n_bytes for t in info.tensors),
        layer_types=tuple(tuple(x) for x in types),
        table_bytes=table_bytes,
        indexer_dim=_meta_int(info, "attention.indexer.key_length"),
        qsa_width=_qsa_width(info, attn),
        hc=hc,
        ple_layer=ple_layer,
        ple_rs_bytes=ple_rs,
        weight_classes=tuple((c, n) for c, n in classes.items() if n),
        output_types=tuple(output_types),
    )


def _qsa_width(info: GGUFInfo, attn: tuple[int, ...]) -> int:
    """The cells the lightning indexer keeps per query (top-k plus a block's tail), when some
    attention layer is sparse (`attention.compress_ratios` > 0 there); 0 when all are dense."""
    ratios = info.get("attention.compress_ratios", None)
    if not isinstance(ratios, list | tuple):
        return 0
    used = [int(ratios[i]) for i in attn if i < len(ratios) and int(ratios[i]) > 0]
    if not used:
        return 0
    return _meta_int(info, "attention.indexer.top_k") + max(used) - 1


def _layer_kinds(
    info: GGUFInfo, arch: str, n_layer: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(attention layers, recurrent layers) among the trunk blocks."""
    hybrid = arch in HYBRID_ARCHES or info.get("ssm.state_size", None) is not None
    if not hybrid:
        return tuple(range(n_layer)), ()
    interval = _meta_int(info, "full_attention_interval", 4) or 4
    attn = tuple(i for i in range(n_layer) if (i + 1) % interval == 0)
    recr = tuple(i for i in range(n_layer) if (i + 1) % interval != 0)
    return attn, recr


@dataclass(frozen=True)
class _Sums:
    """Suffix sums and prefix maxima over trunk layers, for O(1) pricing."""

    dense_suffix: tuple[int, ...]
    expert_suffix: tuple[int, ...]
    attn_suffix: tuple[int, ...]
    recr_suffix: tuple[int, ...]
    layer_max_prefix: tuple[int, ...]  # max over [0:i) of dense + experts
    expert_max_prefix: tuple[int, ...]  # max over [0:i) of experts
    expert_max_suffix: tuple[int, ...]  # max over [i:n) of experts


def range_sum(suffix: tuple[int, ...], r: range) -> int:
    """The sum over the layers of `r` (consecutive, within the trunk) of a `_Sums` suffix."""
    return suffix[r.start] - suffix[r.stop] if r.stop > r.start else 0


def _sums(facts: ModelFacts) -> _Sums:
    n = facts.n_layer
    attn = set(facts.attn_layers)
    recr = set(facts.recr_layers)

    def suffix(values: Sequence[int]) -> tuple[int, ...]:
        out = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            out[i] = out[i + 1] + values[i]
        return tuple(out)

    def prefix_max(values: Sequence[int]) -> tuple[int, ...]:
        out = [0] * (n + 1)
        for i in range(n):
            out[i + 1] = max(out[i], values[i])
        return tuple(out)

    def suffix_max(values: Sequence[int]) -> tuple[int, ...]:
        out = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            out[i] = max(out[i + 1], values[i])
        return tuple(out)

    per_layer = [d + e for d, e in zip(facts.dense_bytes, facts.expert_bytes, strict=True)]
    return _Sums(
        dense_suffix=suffix(facts.dense_bytes),
        expert_suffix=suffix(facts.expert_bytes),
        attn_suffix=suffix([1 if i in attn else 0 for i in range(n)]),
        recr_suffix=suffix([1 if i in recr else 0 for i in range(n)]),
        layer_max_prefix=prefix_max(per_layer),
        expert_max_prefix=prefix_max(facts.expert_bytes),
        expert_max_suffix=suffix_max(facts.expert_bytes),
    )
