"""The Qwen Mixture-of-Experts family qwenrun knows, as frozen values.

Contract: pure data and pure functions, no third-party imports and no I/O. For each model:
canonical name, display name and short aliases, the shape numbers the planner needs (the
config.json values, in GGUF terms), the thinking kind, Qwen's sampling presets per mode and the
hub repos that carry its GGUFs (preferred first); `lookup` finds one by any of its names (an
unknown name is a `ModelNotFoundError` that suggests near ones). Also: the quant quality ladder
(`QUANT_LADDER`, `quant_rank`, `normalize_quant`; `hub/names.py` reads quants in file names) and
the tensor layout a model's shape implies (`tensor_layout`, `param_counts`), which the size
estimate in `planner/recipes.py` and the invariants test share. This module downloads nothing,
reads no file and knows nothing about the machine. Facts come from
../shared/reference/catalog.md (§1 shapes, §2 repos, §3 tensors, §4 sampling) and qwen38.md
(Qwen3.8); where sources disagree, the comment says which way this file goes and why.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from qwenrun import errors
from qwenrun.engine.loadconfig import is_routed_expert

ThinkingKind = Literal["hybrid", "thinking", "direct"]
Arch = Literal["qwen3moe", "qwen3next", "qwen35moe", "qwen4exp"]

HYBRID_ARCHES = ("qwen3next", "qwen35moe", "qwen4exp")
# The llama.cpp architectures of Qwen's GGUFs that qwenrun plans and runs (dense Qwen3 and
# Qwen3.5 too: the same loader rules, just no routed experts to place; `qwen4exp` is
# Qwen3.8-Flash-Next).
QWEN_ARCHES = ("qwen3", "qwen3moe", "qwen3next", "qwen35", "qwen35moe", "qwen4exp")


@dataclass(frozen=True)
class SamplingPreset:
    """Qwen's recommended sampler settings for one mode ("think" or "direct").

    `repeat_penalty` is llama.cpp's repetition penalty (1.0 = off); only the Coder cards
    ask for one (1.05).
    """

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0


@dataclass(frozen=True)
class ModelShape:
    """The config.json numbers that fix every tensor and cache size, in GGUF terms.

    `full_attention_interval` is 1 when every layer is attention; the hybrids (Qwen3-Next,
    Qwen3.5/3.6) have 4: layer i is attention when (i + 1) % 4 == 0, the others are Gated
    DeltaNet layers whose dims are `ssm_*` (GGUF `ssm.state_size` = head dim of K and V,
    `ssm.group_count` = K heads, `ssm.time_step_rank` = V heads, `ssm.conv_kernel`).
    `mtp_layers` counts the extra multi-token-prediction block the checkpoint has; the
    usual GGUFs leave it out (unsloth ships it in separate `-MTP-GGUF` repos).

    Qwen3.8-Flash-Next (`qwen4exp`) adds: `hc` residual streams mixed by hyper-connections
    of rank `hc_rank` (they replace every plain norm); a lightning indexer on each attention
    layer (`indexer_heads` × `indexer_dim`, keeping `indexer_top_k` cells, blocks of
    `compress_ratio`); and an n-gram embedding (PLE) on layer `ple_layer`: a table of
    `ple_table_rows` rows of `ple_row` values, read by (`ple_ngram` − 1) ×
    `ple_heads_per_ngram` heads, with a convolution of `ple_conv_kernel` taps.
    """

    arch: Arch
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    shared_expert_ff: int
    vocab_size: int
    n_ctx_native: int
    full_attention_interval: int = 1
    mtp_layers: int = 0
    ssm_state: int = 0
    ssm_groups: int = 0
    ssm_v_heads: int = 0
    ssm_conv_kernel: int = 0
    hc: int = 0
    hc_rank: int = 0
    indexer_heads: int = 0
    indexer_dim: int = 0
    indexer_top_k: int = 0
    compress_ratio: int = 0
    ple_row: int = 0
    ple_ngram: int = 0
    ple_heads_per_ngram: int = 0
    ple_table_rows: int = 0
    ple_layer: int = 0
    ple_conv_kernel: int = 0

    @property
    def is_hybrid(self) -> bool:
        return self.arch in HYBRID_ARCHES

    def is_attention_layer(self, layer: int) -> bool:
        """Whether block `layer` has full attention (and so a KV cache)."""
        return (layer + 1) % self.full_attention_interval == 0

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if self.is_attention_layer(i))

    @property
    def n_attention_layers(self) -> int:
        return len(self.attention_layers)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint of the family. `params_*` are the model card's figures, in billions.

    `unverified` says, in a sentence a plan shows, what of the entry rests on published sizes
    or third-party configs rather than a GGUF header read (empty: nothing). `published` are
    file sizes in bytes by quant, for models whose sizes cannot be read from a header here:
    the estimate of such a quant is brought to that size (`planner/recipes.estimate`).
    """

    name: str
    display: str
    aliases: tuple[str, ...]
    shape: ModelShape
    thinking: ThinkingKind
    presets: Mapping[str, SamplingPreset]
    repos: tuple[str, ...]
    params_total: float
    params_active: float
    unverified: str = ""
    published: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __hash__(self) -> int:
        # `presets` is a mapping, so the generated hash would fail; the name is unique.
        return hash(self.name)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this model can run in: ("think", "direct"), ("think",) or ("direct",)."""
        return MODES_BY_KIND[self.thinking]


MODES_BY_KIND: Mapping[ThinkingKind, tuple[str, ...]] = MappingProxyType(
    {"hybrid": ("think", "direct"), "thinking": ("think",), "direct": ("direct",)}
)

# ------------------------------------------------------------------------------ shapes
# catalog.md §1.1/§1.2. Context: the GGUF `context_length` (config max_position_embeddings).
# For the original Qwen3 that is 40,960 (the card's 32,768 plus room for the answer).

_QWEN3_VOCAB = 151_936
_QWEN35_VOCAB = 248_320  # padded; Qwen3.5/3.6 share it

SHAPE_QWEN3_30B = ModelShape(
    arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
    n_expert=128, n_expert_used=8, expert_ff=768, shared_expert_ff=0,
    vocab_size=_QWEN3_VOCAB, n_ctx_native=40_960,
)  # fmt: skip
SHAPE_QWEN3_30B_2507 = replace(SHAPE_QWEN3_30B, n_ctx_native=262_144)  # also Coder-30B
SHAPE_QWEN3_235B = ModelShape(
    arch="qwen3moe", n_layer=94, n_embd=4096, n_head=64, n_head_kv=4, head_dim=128,
    n_expert=128, n_expert_used=8, expert_ff=1536, shared_expert_ff=0,
    vocab_size=_QWEN3_VOCAB, n_ctx_native=40_960,
)  # fmt: skip
SHAPE_QWEN3_235B_2507 = replace(SHAPE_QWEN3_235B, n_ctx_native=262_144)
SHAPE_QWEN3_CODER_480B = ModelShape(
    arch="qwen3moe", n_layer=62, n_embd=6144, n_head=96, n_head_kv=8, head_dim=128,
    n_expert=160, n_expert_used=8, expert_ff=2560, shared_expert_ff=0,
    vocab_size=_QWEN3_VOCAB, n_ctx_native=262_144,
)  # fmt: skip
# Qwen3-Next-80B-A3B Instruct/Thinking and Qwen3-Coder-Next share this shape.
SHAPE_QWEN3_NEXT_80B = ModelShape(
    arch="qwen3next", n_layer=48, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
    n_expert=512, n_expert_used=10, expert_ff=512, shared_expert_ff=512,
    vocab_size=_QWEN3_VOCAB, n_ctx_native=262_144, full_attention_interval=4, mtp_layers=1,
    ssm_state=128, ssm_groups=16, ssm_v_heads=32, ssm_conv_kernel=4,
)  # fmt: skip
# Qwen3.6-35B-A3B has the same architecture and config numbers as Qwen3.5-35B-A3B.
SHAPE_QWEN35_35B = ModelShape(
    arch="qwen35moe", n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
    n_expert=256, n_expert_used=8, expert_ff=512, shared_expert_ff=512,
    vocab_size=_QWEN35_VOCAB, n_ctx_native=262_144, full_attention_interval=4, mtp_layers=1,
    ssm_state=128, ssm_groups=16, ssm_v_heads=32, ssm_conv_kernel=4,
)  # fmt: skip
SHAPE_QWEN35_122B = ModelShape(
    arch="qwen35moe", n_layer=48, n_embd=3072, n_head=32, n_head_kv=2, head_dim=256,
    n_expert=256, n_expert_used=8, expert_ff=1024, shared_expert_ff=1024,
    vocab_size=_QWEN35_VOCAB, n_ctx_native=262_144, full_attention_interval=4, mtp_layers=1,
    ssm_state=128, ssm_groups=16, ssm_v_heads=64, ssm_conv_kernel=4,
)  # fmt: skip
SHAPE_QWEN35_397B = ModelShape(
    arch="qwen35moe", n_layer=60, n_embd=4096, n_head=32, n_head_kv=2, head_dim=256,
    n_expert=512, n_expert_used=10, expert_ff=1024, shared_expert_ff=1024,
    vocab_size=_QWEN35_VOCAB, n_ctx_native=262_144, full_attention_interval=4, mtp_layers=1,
    ssm_state=128, ssm_groups=16, ssm_v_heads=64, ssm_conv_kernel=4,
)  # fmt: skip
# Qwen3.8-Flash-Next (qwen38.md §1.1: transformers' configuration_qwen4_exp.py and the real
# config in test fixtures; shapes as the pinned llama.cpp's qwen4exp.cpp creates them). Its 4B
# MTP layer is not in the GGUFs: mtp_layers 0. The n-gram table: 320,001,536 rows of 160.
SHAPE_QWEN38_FLASH_NEXT = ModelShape(
    arch="qwen4exp", n_layer=48, n_embd=2560, n_head=24, n_head_kv=2, head_dim=256,
    n_expert=512, n_expert_used=10, expert_ff=640, shared_expert_ff=640,
    vocab_size=_QWEN35_VOCAB, n_ctx_native=262_144, full_attention_interval=4,
    ssm_state=128, ssm_groups=16, ssm_v_heads=48, ssm_conv_kernel=4,
    hc=4, hc_rank=320, indexer_heads=4, indexer_dim=128, indexer_top_k=2048, compress_ratio=4,
    ple_row=160, ple_ngram=3, ple_heads_per_ngram=8, ple_table_rows=320_001_536, ple_layer=1,
    ple_conv_kernel=4,
)  # fmt: skip
# Qwen3.8-2.4T-A95B (no header reachable): 92 layers, 512 experts top-10 + 1 shared, hidden
# 8192, 64 Q / 4 KV heads, GDN 128 V / 16 QK heads are third-party readings of its card
# (qwen38.md §1); head_dim 256 and expert FFN 2048 (shared too, as in Qwen3.5) make 2.42T
# total and 95.3B active parameters, and BF16 4.84 TB (+ its MTP block: the 4.89 published).
SHAPE_QWEN38_2_4T = ModelShape(
    arch="qwen35moe", n_layer=92, n_embd=8192, n_head=64, n_head_kv=4, head_dim=256,
    n_expert=512, n_expert_used=10, expert_ff=2048, shared_expert_ff=2048,
    vocab_size=_QWEN35_VOCAB, n_ctx_native=262_144, full_attention_interval=4, mtp_layers=1,
    ssm_state=128, ssm_groups=16, ssm_v_heads=128, ssm_conv_kernel=4,
)  # fmt: skip

# unsloth's published sizes (bytes) where no header is reachable (qwen38.md §1-2). Flash-Next:
# exact bytes where a pin gives them. 2.4T: one size per bit class, taken as that class's usual
# unsloth quant; its 1-bit figure is 1.3 bits per weight for 2.42T parameters, below IQ1_S's
# 1.56, so one of the sources is off.
_PUBLISHED_FLASH_NEXT = MappingProxyType({
    "UD-IQ1_S": 72_500_000_000, "UD-Q2_K_XL": 78_900_000_000, "UD-IQ3_XXS": 81_961_823_936,
    "UD-Q3_K_XL": 89_986_353_824, "UD-IQ4_XS": 93_700_000_000, "UD-Q4_K_XL": 111_334_654_784,
    "UD-Q5_K_XL": 158_300_000_000, "UD-Q6_K_XL": 169_200_000_000, "Q8_0": 188_200_000_000,
    "BF16": 355_000_000_000,
})  # fmt: skip
_PUBLISHED_2_4T = MappingProxyType({
    "UD-IQ1_S": 397_000_000_000, "UD-Q2_K_XL": 657_000_000_000, "UD-Q3_K_XL": 956_000_000_000,
    "UD-Q4_K_XL": 1_310_000_000_000, "BF16": 4_890_000_000_000,
})  # fmt: skip

# ------------------------------------------------------------------------------ sampling
# catalog.md §4.


def _presets(**modes: SamplingPreset) -> Mapping[str, SamplingPreset]:
    return MappingProxyType(dict(modes))


_THINK = SamplingPreset(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
_DIRECT = SamplingPreset(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
# The original Qwen3 cards recommend presence_penalty 1.5 for their quantized releases
# (GGUF/AWQ) against endless repetition; qwenrun only runs quantized GGUFs.
PRESETS_QWEN3_HYBRID = _presets(
    think=SamplingPreset(0.6, 0.95, 20, 0.0, presence_penalty=1.5),
    direct=SamplingPreset(0.7, 0.8, 20, 0.0, presence_penalty=1.5),
)
PRESETS_INSTRUCT = _presets(direct=_DIRECT)  # 2507 Instruct, Next-Instruct: penalty optional
PRESETS_THINKING = _presets(think=_THINK)  # Thinking-2507, Next-Thinking
PRESETS_CODER = _presets(direct=SamplingPreset(0.7, 0.8, 20, 0.0, repeat_penalty=1.05))
# Qwen3.5 "general" presets (the coding / reasoning variants are for the user to pick).
PRESETS_QWEN35 = _presets(
    think=SamplingPreset(1.0, 0.95, 20, 0.0, presence_penalty=1.5),
    direct=SamplingPreset(0.7, 0.8, 20, 0.0, presence_penalty=1.5),
)
# Qwen3.6's thinking presence_penalty: its own (FP8) card says 1.5, the 3.6-27B card and
# unsloth's guide say 0.0. This model's own card wins, which also matches Qwen3.5.
PRESETS_QWEN36 = PRESETS_QWEN35
# Qwen3.8's cards (qwen38.md §4): thinking 1.0/0.95/20, no presence penalty (as its
# generation_config.json); direct 0.7/0.8/20 with presence 1.5. 2.4T only thinks.
_QWEN38_THINK = SamplingPreset(1.0, 0.95, 20, 0.0)
PRESETS_QWEN38 = _presets(
    think=_QWEN38_THINK, direct=SamplingPreset(0.7, 0.8, 20, 0.0, presence_penalty=1.5)
)
PRESETS_QWEN38_THINKING = _presets(think=_QWEN38_THINK)

# ------------------------------------------------------------------------------ the catalog
# Repos: catalog.md §2.1, official Qwen first where it exists (a downloader takes the first
# repo that has the quant), then unsloth, bartowski, others. Only repos seen in the sources:
# an unverified guess would cost the downloader a failed round trip.
#
# Names are the HF model ids, lower-cased, so that a GGUF's `general.name` finds its entry
# (chat.match_catalog looks names up to choose presets and the thinking kind). That settles
# `qwen3-30b-a3b` and `qwen3-235b-a22b`: they are the original hybrid checkpoints, as on the
# hub; the 2507 releases get their own names and `-instruct` / `-thinking` aliases.

CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="qwen3-30b-a3b",
        display="Qwen3-30B-A3B",
        aliases=("qwen3-30b",),
        shape=SHAPE_QWEN3_30B,
        thinking="hybrid",
        presets=PRESETS_QWEN3_HYBRID,
        repos=(
            "Qwen/Qwen3-30B-A3B-GGUF",
            "unsloth/Qwen3-30B-A3B-GGUF",
            "bartowski/Qwen_Qwen3-30B-A3B-GGUF",
            "lmstudio-community/Qwen3-30B-A3B-GGUF",
            "ggml-org/Qwen3-30B-A3B-GGUF",
        ),
        params_total=30.5,
        params_active=3.3,
    ),
    ModelSpec(
        name="qwen3-30b-a3b-instruct-2507",
        display="Qwen3-30B-A3B-Instruct-2507",
        aliases=("qwen3-30b-a3b-instruct", "qwen3-30b-instruct", "qwen3-30b-instruct-2507"),
        shape=SHAPE_QWEN3_30B_2507,
        thinking="direct",
        presets=PRESETS_INSTRUCT,
        repos=(
            "unsloth/Qwen3-30B-A3B-Instruct-2507-GGUF",
            "bartowski/Qwen_Qwen3-30B-A3B-Instruct-2507-GGUF",
            "lmstudio-community/Qwen3-30B-A3B-Instruct-2507-GGUF",
        ),
        params_total=30.5,
        params_active=3.3,
    ),
    ModelSpec(
        name="qwen3-30b-a3b-thinking-2507",
        display="Qwen3-30B-A3B-Thinking-2507",
        aliases=("qwen3-30b-a3b-thinking", "qwen3-30b-thinking", "qwen3-30b-thinking-2507"),
        shape=SHAPE_QWEN3_30B_2507,
        thinking="thinking",
        presets=PRESETS_THINKING,
        repos=(
            "unsloth/Qwen3-30B-A3B-Thinking-2507-GGUF",
            "bartowski/Qwen_Qwen3-30B-A3B-Thinking-2507-GGUF",
        ),
        params_total=30.5,
        params_active=3.3,
    ),
    ModelSpec(
        name="qwen3-coder-30b-a3b-instruct",
        display="Qwen3-Coder-30B-A3B-Instruct",
        aliases=("qwen3-coder", "qwen3-coder-30b", "qwen3-coder-30b-a3b"),
        shape=SHAPE_QWEN3_30B_2507,
        thinking="direct",
        presets=PRESETS_CODER,
        repos=(
            "unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF",
            "unsloth/Qwen3-Coder-30B-A3B-Instruct-1M-GGUF",
        ),
        params_total=30.5,
        params_active=3.3,
    ),
    ModelSpec(
        name="qwen3-235b-a22b",
        display="Qwen3-235B-A22B",
        aliases=("qwen3-235b",),
        shape=SHAPE_QWEN3_235B,
        thinking="hybrid",
        presets=PRESETS_QWEN3_HYBRID,
        repos=("Qwen/Qwen3-235B-A22B-GGUF", "unsloth/Qwen3-235B-A22B-GGUF"),
        params_total=235.0,
        params_active=22.0,
    ),
    ModelSpec(
        name="qwen3-235b-a22b-instruct-2507",
        display="Qwen3-235B-A22B-Instruct-2507",
        aliases=("qwen3-235b-a22b-instruct", "qwen3-235b-instruct", "qwen3-235b-instruct-2507"),
        shape=SHAPE_QWEN3_235B_2507,
        thinking="direct",
        presets=PRESETS_INSTRUCT,
        repos=("unsloth/Qwen3-235B-A22B-Instruct-2507-GGUF",),
        params_total=235.0,
        params_active=22.0,
    ),
    ModelSpec(
        name="qwen3-235b-a22b-thinking-2507",
        display="Qwen3-235B-A22B-Thinking-2507",
        aliases=("qwen3-235b-a22b-thinking", "qwen3-235b-thinking", "qwen3-235b-thinking-2507"),
        shape=SHAPE_QWEN3_235B_2507,
        thinking="thinking",
        presets=PRESETS_THINKING,
        repos=("unsloth/Qwen3-235B-A22B-Thinking-2507-GGUF",),
        params_total=235.0,
        params_active=22.0,
    ),
    ModelSpec(
        name="qwen3-coder-480b-a35b-instruct",
        display="Qwen3-Coder-480B-A35B-Instruct",
        aliases=("qwen3-coder-480b", "qwen3-coder-480b-a35b"),
        shape=SHAPE_QWEN3_CODER_480B,
        thinking="direct",
        presets=PRESETS_CODER,
        repos=(
            "unsloth/Qwen3-Coder-480B-A35B-Instruct-GGUF",
            "unsloth/Qwen3-Coder-480B-A35B-Instruct-1M-GGUF",
        ),
        params_total=480.0,
        params_active=35.0,
    ),
    ModelSpec(
        name="qwen3-next-80b-a3b-instruct",
        display="Qwen3-Next-80B-A3B-Instruct",
        aliases=("qwen3-next", "qwen3-next-80b", "qwen3-next-80b-a3b", "qwen3-next-instruct"),
        shape=SHAPE_QWEN3_NEXT_80B,
        thinking="direct",
        presets=PRESETS_INSTRUCT,
        # Qwen/Qwen3-Next-80B-A3B-Instruct-GGUF is likely but was not seen: left out.
        repos=("unsloth/Qwen3-Next-80B-A3B-Instruct-GGUF",),
        params_total=80.0,
        params_active=3.0,
    ),
    ModelSpec(
        name="qwen3-next-80b-a3b-thinking",
        display="Qwen3-Next-80B-A3B-Thinking",
        aliases=("qwen3-next-thinking", "qwen3-next-80b-thinking"),
        shape=SHAPE_QWEN3_NEXT_80B,
        thinking="thinking",
        presets=PRESETS_THINKING,
        repos=(
            "Qwen/Qwen3-Next-80B-A3B-Thinking-GGUF",
            "unsloth/Qwen3-Next-80B-A3B-Thinking-GGUF",
            "bartowski/Qwen_Qwen3-Next-80B-A3B-Thinking-GGUF",
        ),
        params_total=80.0,
        params_active=3.0,
    ),
    ModelSpec(
        name="qwen3-coder-next",
        display="Qwen3-Coder-Next",
        aliases=("qwen3-coder-next-80b", "qwen3-coder-next-80b-a3b"),
        shape=SHAPE_QWEN3_NEXT_80B,
        thinking="direct",
        presets=PRESETS_CODER,
        repos=(
            "Qwen/Qwen3-Coder-Next-GGUF",
            "unsloth/Qwen3-Coder-Next-GGUF",
            "bartowski/Qwen_Qwen3-Coder-Next-GGUF",
        ),
        params_total=80.0,
        params_active=3.0,
    ),
    ModelSpec(
        name="qwen3.5-35b-a3b",
        display="Qwen3.5-35B-A3B",
        aliases=("qwen3.5-35b",),
        shape=SHAPE_QWEN35_35B,
        thinking="hybrid",
        presets=PRESETS_QWEN35,
        repos=("unsloth/Qwen3.5-35B-A3B-GGUF", "bartowski/Qwen_Qwen3.5-35B-A3B-GGUF"),
        params_total=35.0,
        params_active=3.0,
    ),
    ModelSpec(
        name="qwen3.6-35b-a3b",
        display="Qwen3.6-35B-A3B",
        # The only open Qwen3.6 MoE (catalog.md §1.4), so plain "qwen3.6" is unambiguous.
        aliases=("qwen3.6-35b", "qwen3.6"),
        shape=SHAPE_QWEN35_35B,
        thinking="hybrid",
        presets=PRESETS_QWEN36,
        repos=(
            "unsloth/Qwen3.6-35B-A3B-GGUF",
            "bartowski/Qwen_Qwen3.6-35B-A3B-GGUF",
            "lmstudio-community/Qwen3.6-35B-A3B-GGUF",
        ),
        params_total=35.0,
        params_active=3.0,
    ),
    ModelSpec(
        name="qwen3.5-122b-a10b",
        display="Qwen3.5-122B-A10B",
        aliases=("qwen3.5-122b",),
        shape=SHAPE_QWEN35_122B,
        thinking="hybrid",
        presets=PRESETS_QWEN35,
        repos=("unsloth/Qwen3.5-122B-A10B-GGUF", "bartowski/Qwen_Qwen3.5-122B-A10B-GGUF"),
        params_total=122.0,
        params_active=10.0,
    ),
    ModelSpec(
        name="qwen3.5-397b-a17b",
        display="Qwen3.5-397B-A17B",
        aliases=("qwen3.5-397b",),
        shape=SHAPE_QWEN35_397B,
        thinking="hybrid",
        presets=PRESETS_QWEN35,
        repos=("unsloth/Qwen3.5-397B-A17B-GGUF",),
        params_total=397.0,
        params_active=17.0,
    ),
    # qwen38.md §1: built on Qwen3.5-35B-A3B-Base: that model's shape, thinking and presets
    # are presumed (no header read). The unsloth repo is the one its hub discussions name.
    ModelSpec(
        name="qwen-agentworld-35b-a3b",
        display="Qwen-AgentWorld-35B-A3B",
        aliases=("qwen-agentworld", "qwen-agentworld-35b"),
        shape=SHAPE_QWEN35_35B,
        thinking="hybrid",
        presets=PRESETS_QWEN35,
        repos=("unsloth/Qwen-AgentWorld-35B-A3B-GGUF",),
        params_total=35.0,
        params_active=3.0,
        unverified=(
            "its shape is presumed to be Qwen3.5-35B-A3B's (the model it is built on): no "
            "GGUF header of it was read"
        ),
    ),
    ModelSpec(
        name="qwen3.8-flash-next",
        display="Qwen3.8-Flash-Next",
        aliases=(),
        shape=SHAPE_QWEN38_FLASH_NEXT,
        thinking="hybrid",
        presets=PRESETS_QWEN38,
        repos=("unsloth/Qwen3.8-Flash-Next-GGUF", "bartowski/Qwen3.8-Flash-Next-GGUF"),
        params_total=176.9,  # 125B main + the 51.2B n-gram table, as the GGUF holds them
        params_active=6.0,
        unverified=(
            "no header of its GGUFs was read here: sizes are the quant recipes' brought to "
            "unsloth's published file sizes"
        ),
        published=_PUBLISHED_FLASH_NEXT,
    ),
    ModelSpec(
        name="qwen3.8-2.4t-a95b",
        display="Qwen3.8-2.4T-A95B",
        aliases=("qwen3.8-2.4t",),
        shape=SHAPE_QWEN38_2_4T,
        thinking="thinking",  # its template raises on enable_thinking=false
        presets=PRESETS_QWEN38_THINKING,
        repos=("unsloth/Qwen3.8-2.4T-A95B-GGUF",),
        params_total=2400.0,
        params_active=95.0,
        unverified=(
            "its head and expert sizes are inferred from the published parameter counts, and "
            "its sizes are unsloth's published ones per bit class (no GGUF header was read)"
        ),
        published=_PUBLISHED_2_4T,
    ),
)


def _key(name: str) -> str:
    """A lookup key: case-folded, spaces/underscores as hyphens, org prefix and -GGUF gone.

    So `Qwen/Qwen3-30B-A3B-GGUF`, `Qwen3 30B A3B` (llama.cpp's `general.name` spelling) and
    `qwen3-30b-a3b` are the same key.
    """
    key = name.strip().lower()
    key = re.sub(r"^(hf\.co/|huggingface\.co/)?qwen/", "", key)
    key = re.sub(r"[\s_]+", "-", key)
    return re.sub(r"-gguf$", "", key)


_BY_KEY: Mapping[str, ModelSpec] = MappingProxyType(
    {_key(n): spec for spec in CATALOG for n in (spec.name, *spec.aliases)}
)


def lookup(name: str) -> ModelSpec:
    """The catalog entry named `name` (canonical name or alias, any case)."""
    spec = _BY_KEY.get(_key(name))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=3, cutoff=0.6)
    message = f"unknown model {name!r}"
    if close:
        message += f"; did you mean {', '.join(close)}?"
    raise errors.ModelNotFoundError(
        message,
        hint="`qwenrun probe` lists the catalog; a hub repo (owner/name) or a .gguf file works too",
    )


# ------------------------------------------------------------------------------ quants
# Best first. Within one bit class: unsloth's dynamic "UD-" quant, then bartowski's "_L"/"_XL"
# (embeddings and output at Q8_0), then llama.cpp's own mixes. The full-precision types head
# the ladder because they are the best quality; a planner that wants speed can skip
# FULL_PRECISION.
QUANT_LADDER: tuple[str, ...] = (
    "F32", "BF16", "F16",
    "UD-Q8_K_XL", "Q8_0",
    "UD-Q6_K_XL", "Q6_K_L", "Q6_K",
    "UD-Q5_K_XL", "Q5_K_L", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "UD-Q4_K_XL", "Q4_K_L", "Q4_K_M", "Q4_K_S", "Q4_1",
    "IQ4_NL", "UD-IQ4_XS", "IQ4_XS", "Q4_0", "MXFP4_MOE",
    "UD-Q3_K_XL", "Q3_K_XL", "Q3_K_L", "Q3_K_M", "IQ3_M", "IQ3_S", "Q3_K_S",
    "UD-IQ3_XXS", "IQ3_XS", "IQ3_XXS",
    "UD-Q2_K_XL", "Q2_K_L", "Q2_K", "Q2_K_S",
    "UD-IQ2_M", "IQ2_M", "IQ2_S", "IQ2_XS", "UD-IQ2_XXS", "IQ2_XXS",
    "UD-IQ1_M", "IQ1_M", "UD-IQ1_S", "IQ1_S",
)  # fmt: skip
FULL_PRECISION: tuple[str, ...] = ("F32", "BF16", "F16")

_RANK: Mapping[str, int] = MappingProxyType({q: i for i, q in enumerate(QUANT_LADDER)})
_SYNONYMS: Mapping[str, str] = MappingProxyType({"FP16": "F16", "FP32": "F32"})


def normalize_quant(q: str) -> str:
    """The canonical spelling of a quant name: `q4_k_m` → `Q4_K_M`, `ud-q4_k_xl` → `UD-Q4_K_XL`."""
    text = q.strip().upper()
    if not text:
        raise errors.UsageError("empty quant name", hint="name a quant, e.g. Q4_K_M")
    text = re.sub(r"^UD[_-]", "UD-", text)
    return _SYNONYMS.get(text, text)


def quant_rank(quant: str) -> int:
    """Position on the quality ladder: lower is better; unknown quants rank after all known."""
    return _RANK.get(normalize_quant(quant), len(QUANT_LADDER))


# ------------------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class TensorShape:
    """One tensor a model's GGUF holds: llama.cpp's name and ggml shape (ne0 first)."""

    name: str
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_routed_expert(self) -> bool:
        return is_routed_expert(self.name)


def _attention(p: str, s: ModelShape) -> list[TensorShape]:
    # The hybrids gate attention: attn_q holds query and gate per head (2 × n_head × head_dim).
    q_rows = (2 if s.is_hybrid else 1) * s.n_head * s.head_dim
    kv_rows = s.n_head_kv * s.head_dim
    return [
        TensorShape(p + "attn_q.weight", (s.n_embd, q_rows)),
        TensorShape(p + "attn_k.weight", (s.n_embd, kv_rows)),
        TensorShape(p + "attn_v.weight", (s.n_embd, kv_rows)),
        TensorShape(p + "attn_output.weight", (s.n_head * s.head_dim, s.n_embd)),
        TensorShape(p + "attn_q_norm.weight", (s.head_dim,)),
        TensorShape(p + "attn_k_norm.weight", (s.head_dim,)),
    ]


def _delta_net(p: str, s: ModelShape) -> list[TensorShape]:
    """A Gated DeltaNet layer, named as the llama.cpp that qwenrun pins loads it."""
    kd, vd = s.ssm_state * s.ssm_groups, s.ssm_state * s.ssm_v_heads
    conv = 2 * kd + vd
    out = [
        TensorShape(p + "attn_qkv.weight", (s.n_embd, conv)),
        TensorShape(p + "attn_gate.weight", (s.n_embd, vd)),
        TensorShape(p + "ssm_conv1d.weight", (s.ssm_conv_kernel, conv)),
        TensorShape(p + "ssm_dt.bias", (s.ssm_v_heads,)),
        TensorShape(p + "ssm_a", (s.ssm_v_heads,)),
        TensorShape(p + "ssm_norm.weight", (s.ssm_state,)),
        TensorShape(p + "ssm_out.weight", (vd, s.n_embd)),
    ]
    if s.arch in ("qwen35moe", "qwen4exp"):
        out += [
            TensorShape(p + "ssm_beta.weight", (s.n_embd, s.ssm_v_heads)),
            TensorShape(p + "ssm_alpha.weight", (s.n_embd, s.ssm_v_heads)),
        ]
    else:
        out.append(TensorShape(p + "ssm_ba.weight", (s.n_embd, 2 * s.ssm_v_heads)))
    return out


def _moe(p: str, s: ModelShape) -> list[TensorShape]:
    h, f, e = s.n_embd, s.expert_ff, s.n_expert
    out = [
        TensorShape(p + "ffn_gate_inp.weight", (h, e)),
        TensorShape(p + "ffn_gate_exps.weight", (h, f, e)),
        TensorShape(p + "ffn_up_exps.weight", (h, f, e)),
        TensorShape(p + "ffn_down_exps.weight", (f, h, e)),
    ]
    if s.shared_expert_ff:
        fs = s.shared_expert_ff
        out += [
            TensorShape(p + "ffn_gate_inp_shexp.weight", (h,)),
            TensorShape(p + "ffn_gate_shexp.weight", (h, fs)),
            TensorShape(p + "ffn_up_shexp.weight", (h, fs)),
            TensorShape(p + "ffn_down_shexp.weight", (fs, h)),
        ]
    return out


def _block(i: int, s: ModelShape, *, attention: bool) -> list[TensorShape]:
    p = f"blk.{i}."
    out = [TensorShape(p + "attn_norm.weight", (s.n_embd,))]
    out += _attention(p, s) if attention else _delta_net(p, s)
    norm = "post_attention_norm" if s.is_hybrid else "ffn_norm"
    out.append(TensorShape(p + norm + ".weight", (s.n_embd,)))
    return out + _moe(p, s)


def _mtp_block(i: int, s: ModelShape) -> list[TensorShape]:
    """The NextN block an `-MTP` GGUF appends at blk.{n_layer}: an attention layer plus MoE."""
    p = f"blk.{i}."
    h = s.n_embd
    return [
        *_block(i, s, attention=True),
        TensorShape(p + "nextn.eh_proj.weight", (2 * h, h)),
        TensorShape(p + "nextn.enorm.weight", (h,)),
        TensorShape(p + "nextn.hnorm.weight", (h,)),
        TensorShape(p + "nextn.shared_head_norm.weight", (h,)),
    ]


NGRAM_TABLE = "per_layer_token_embd.weight"


def _hc_mixer(name: str, s: ModelShape) -> list[TensorShape]:
    """One hyper-connection mixer (`hc_attn`, `hc_ffn`, or the final `output_hc`): grouped
    RMSNorm gammas, the low-rank down/up projections, and (in blocks) the stream injection."""
    h, hc, r = s.n_embd, s.hc, s.hc_rank
    out = [
        TensorShape(f"{name}_norm.weight", (h, hc)),
        TensorShape(f"{name}_down.weight", (hc * h, r)),
        TensorShape(f"{name}_up.weight", (r, hc * h)),
    ]
    if not name.startswith("output"):
        out.append(TensorShape(f"{name}_inject.weight", (hc * h, hc)))
    return out


def _qwen4exp_block(i: int, s: ModelShape) -> list[TensorShape]:
    """A Qwen3.8-Flash-Next block as src/models/qwen4exp.cpp creates it: two HC mixers in
    place of the norms; gated attention with the lightning indexer, or a Gated DeltaNet; the
    n-gram module on its one layer; the MoE with its gated shared expert."""
    p, h, hc = f"blk.{i}.", s.n_embd, s.hc
    out = _hc_mixer(p + "hc_attn", s) + _hc_mixer(p + "hc_ffn", s)
    if s.is_attention_layer(i):
        d = s.indexer_dim
        out += [
            *_attention(p, s),
            TensorShape(p + "indexer.q_proj.weight", (h, s.indexer_heads * d)),
            TensorShape(p + "indexer.k_proj.weight", (h, d)),
            TensorShape(p + "indexer.q_norm.weight", (d,)),
            TensorShape(p + "indexer.k_norm.weight", (d,)),
        ]
    else:
        out += _delta_net(p, s)
    if i == s.ple_layer and s.ple_table_rows:
        out += [
            TensorShape(p + "ple_key.weight", (h, hc * h)),
            TensorShape(p + "ple_value.weight", (h, h)),
            *(TensorShape(p + f"ple_norm_{n}.weight", (h, hc)) for n in ("key", "query", "conv")),
            TensorShape(p + "ple_conv1d.weight", (s.ple_conv_kernel, hc * h)),
        ]
    return out + _moe(p, s)


def tensor_layout(shape: ModelShape, *, include_mtp: bool = False) -> tuple[TensorShape, ...]:
    """Every tensor of the model's GGUF, in llama.cpp's names and ggml shapes.

    Qwen MoE models do not tie embeddings, so `output.weight` is its own tensor.
    """
    h, v = shape.n_embd, shape.vocab_size
    if shape.arch == "qwen4exp":
        # No output_norm: the final hyper-connection mixer takes its place.
        head = [TensorShape("token_embd.weight", (h, v)), *_hc_mixer("output_hc", shape)]
        if shape.ple_table_rows:
            head.append(TensorShape(NGRAM_TABLE, (shape.ple_row, shape.ple_table_rows)))
        blocks = [t for i in range(shape.n_layer) for t in _qwen4exp_block(i, shape)]
        return (*head, *blocks, TensorShape("output.weight", (h, v)))
    out = [TensorShape("token_embd.weight", (h, v))]
    for i in range(shape.n_layer):
        out += _block(i, shape, attention=shape.is_attention_layer(i))
    if include_mtp:
        out += [t for m in range(shape.mtp_layers) for t in _mtp_block(shape.n_layer + m, shape)]
    out += [TensorShape("output_norm.weight", (h,)), TensorShape("output.weight", (h, v))]
    return tuple(out)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a shape (not billions: plain counts), without the MTP block."""

    total: int
    routed_experts: int
    active: int
    embeddings: int = field(default=0)  # token_embd + output


def param_counts(shape: ModelShape) -> ParamCounts:
    """Total and per-token active parameters implied by the shape.

    Active = everything except the routed experts, plus n_expert_used / n_expert of them:
    the convention of the Qwen3 cards (3.3B for 30B-A3B counts the embeddings). An n-gram
    table is in the total (the GGUF holds it) but not active: a token reads 16 of its rows.
    """
    layout = tensor_layout(shape)
    total = sum(t.n_elements for t in layout)
    routed = sum(t.n_elements for t in layout if t.is_routed_expert)
    embeddings = sum(
        t.n_elements for t in layout if t.name in ("token_embd.weight", "output.weight")
    )
    table = sum(t.n_elements for t in layout if t.name == NGRAM_TABLE)
    active = total - table - routed + routed * shape.n_expert_used // shape.n_expert
    return ParamCounts(total=total, routed_experts=routed, active=active, embeddings=embeddings)
