"""Plain values that say where a model's tensors go and how its context is set up.

Contract: pure data and pure functions, no third-party imports. The planner produces a
`LoadConfig`; the engine (`engine/llama.py`) consumes one. The override patterns are the same
regular expressions llama.cpp's own CLI builds for `--cpu-moe`, `--n-cpu-moe N` and
`-ot PATTERN=BUFT` (common/common.h, common/arg.cpp), matched by llama.cpp with
`std::regex_search` against tensor names, first match winning. Also here, because the
patterns rest on them: llama.cpp's tensor names (`blk.N.…`, routed experts) and the one
table of KV cache types that the engine (ggml ids) and the cost model (bytes) both read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

# llama.cpp's LLM_FFN_EXPS_REGEX: every routed-expert tensor (separate or fused gate/up,
# "chexps" variants), and never a shared expert (`_shexp`).
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_EXPS_RE = re.compile(EXPS_REGEX)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")

FlashAttn = Literal["auto", "on", "off"]


def layer_of(tensor_name: str) -> int | None:
    """The block a tensor belongs to (`blk.7.ffn_up_exps.weight` → 7); None outside blocks."""
    m = _LAYER_RE.match(tensor_name)
    return int(m.group(1)) if m else None


def is_routed_expert(tensor_name: str) -> bool:
    """Whether llama.cpp's `--cpu-moe` pattern moves this tensor (never a shared expert)."""
    return _EXPS_RE.search(tensor_name) is not None


@dataclass(frozen=True)
class KVType:
    """A KV cache element type: its ggml id, and its bytes per block of elements."""

    name: str
    ggml_id: int  # enum ggml_type (ggml.h)
    block_elems: int
    block_bytes: int

    def row_bytes(self, n_elements: int) -> int:
        return -(-n_elements // self.block_elems) * self.block_bytes


# The KV cache types llama.cpp accepts. Block sizes are gguf's GGML_QUANT_SIZES, ids ggml.h's
# enum (tests check both against the gguf package).
KV_TYPES: Mapping[str, KVType] = MappingProxyType(
    {
        t.name: t
        for t in (
            KVType("f32", 0, 1, 4),
            KVType("f16", 1, 1, 2),
            KVType("bf16", 30, 1, 2),
            KVType("q8_0", 8, 32, 34),
            KVType("q4_0", 2, 32, 18),
            KVType("q4_1", 3, 32, 20),
            KVType("iq4_nl", 20, 32, 18),
            KVType("q5_0", 6, 32, 22),
            KVType("q5_1", 7, 32, 24),
        )
    }
)


def layer_experts_pattern(layer: int) -> str:
    """The pattern llama.cpp's `--n-cpu-moe` adds for one layer (`llm_ffn_block_regex`)."""
    return rf"blk\.{layer}{EXPS_REGEX}"


def expert_tensor_pattern(tensor_name: str) -> str:
    """A pattern that matches exactly one tensor, e.g. `blk.7.ffn_down_exps.weight`."""
    return "^" + re.escape(tensor_name) + "$"


@dataclass(frozen=True)
class Placement:
    """Which tensors live on which device.

    `n_gpu_layers` follows llama.cpp: -1 means every layer (and the output layer) on the
    GPU when the build has one; on a CPU-only build everything is on the CPU anyway.
    Routed experts of the layers in `expert_cpu_layers` (or of every layer with
    `cpu_moe_all`) and the single tensors in `expert_cpu_tensors` are kept in system RAM
    and computed by the CPU. `extra_overrides` are raw `(pattern, buffer type)` pairs as
    given to `-ot`, applied after qwenrun's own patterns.
    """

    n_gpu_layers: int = -1
    cpu_moe_all: bool = False
    expert_cpu_layers: tuple[int, ...] = ()
    expert_cpu_tensors: tuple[str, ...] = ()
    extra_overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def n_cpu_moe(cls, n: int, n_gpu_layers: int = -1) -> Placement:
        """`--n-cpu-moe N`: the routed experts of blocks 0..N-1 on the CPU."""
        return cls(n_gpu_layers=n_gpu_layers, expert_cpu_layers=tuple(range(max(0, n))))

    def override_patterns(self) -> list[tuple[str, str]]:
        """The `(pattern, buffer type name)` list handed to llama.cpp, in priority order."""
        pats: list[tuple[str, str]] = []
        if self.cpu_moe_all:
            pats.append((EXPS_REGEX, "CPU"))
        else:
            pats.extend((layer_experts_pattern(i), "CPU") for i in self.expert_cpu_layers)
            pats.extend((expert_tensor_pattern(t), "CPU") for t in self.expert_cpu_tensors)
        pats.extend(self.extra_overrides)
        return pats

    @property
    def overrides_to_cpu(self) -> bool:
        return any(buft.upper() == "CPU" for _, buft in self.override_patterns())

    def describe(self) -> str:
        """A short human description: `experts of layers 0-11 on CPU`, `all on GPU`."""
        if self.cpu_moe_all:
            return "all routed experts on CPU"
        parts = []
        if self.expert_cpu_layers:
            parts.append(f"experts of {layer_ranges(self.expert_cpu_layers)} on CPU")
        if self.expert_cpu_tensors:
            parts.append(f"{len(self.expert_cpu_tensors)} more expert tensors on CPU")
        if self.extra_overrides:
            parts.append(f"{len(self.extra_overrides)} custom overrides")
        return ", ".join(parts) if parts else "no expert overrides"


def layer_ranges(layers: Sequence[int]) -> str:
    """`(0, 1, 2, 5)` -> `layers 0-2, 5`."""
    items = sorted(set(layers))
    spans: list[str] = []
    start = prev = items[0]
    for x in [*items[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    word = "layer" if len(items) == 1 else "layers"
    return f"{word} {', '.join(spans)}"


@dataclass(frozen=True)
class LoadConfig:
    """Everything llama.cpp needs to load a model and create its context.

    `use_mmap=None` lets the engine decide: off when tensors are overridden to the CPU,
    as llama.cpp's loader itself advises, on otherwise (fast start, shared page cache).
    `extra_bufts=False` turns off llama.cpp's extra CPU buffer types (weights repacked for
    AVX2/AVX-512/AMX kernels): slower CPU matmuls, but the plain kernels run on CPUs where
    the AMX ones crash (see `engine/crash.py`).
    `prompt_cache` caps the prompt cache on disk in bytes (`engine/promptcache.py`); 0 turns
    it off, None leaves it to `QWENRUN_PROMPT_CACHE` or the default.
    """

    placement: Placement = field(default_factory=Placement)
    n_ctx: int = 8192
    n_batch: int = 2048
    n_ubatch: int = 512
    kv_type: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_threads: int | None = None
    use_mmap: bool | None = None
    extra_bufts: bool = True
    prompt_cache: int | None = None

    def mmap_enabled(self) -> bool:
        if self.use_mmap is not None:
            return self.use_mmap
        return not self.placement.overrides_to_cpu
