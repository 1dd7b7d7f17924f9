"""Plain values that say where a model's tensors go and how its context is set up.

Contract: pure data and pure functions, no third-party imports. The planner produces a
`LoadConfig`; the engine (`engine/llama.py`) consumes one. The override patterns are the same
regular expressions llama.cpp's own CLI builds for `--cpu-moe`, `--n-cpu-moe N` and
`-ot PATTERN=BUFT` (common/common.h, common/arg.cpp), matched by llama.cpp with
`std::regex_search` against tensor names, first match winning. Also here, because the
patterns rest on them: llama.cpp's tensor names (`blk.N.…`, routed experts) and the one
table of KV cache types that the engine (ggml ids) and the cost model (bytes) both read.

Several devices (issue 18): a `Placement` also names the RPC workers to register, the
ordered devices that take layers and their `tensor_split` (contiguous blocks of layers per
device, as llama.cpp assigns them), and `ExpertHome`s: routed experts kept on a named buffer
type (this machine's CPU, a GPU, or a worker's device). Those names are checked against the
devices llama.cpp really has when the engine loads (`engine/devices.py`); here only what can
be checked without them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from qwenrun import errors

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
class ExpertHome:
    """Routed experts kept on one named buffer type instead of their layer's device.

    `buffer` is a buffer type or device name as llama.cpp lists them (`engine/devices.py`):
    "CPU" (this machine's RAM), "CUDA1", or a worker's device by its buffer type name,
    "RPC1[10.0.0.2:50052]" (device 1 of that worker; `qwenrun worker` serves its GPUs first
    and its CPU last, so a worker keeps experts in its own RAM through its last device).
    Buffer type names of workers stay the same from one process to the next; device names
    (`RPC3`) depend on the order workers were registered in.
    `layers` moves every routed-expert tensor of those blocks, `tensors` single tensors
    (`blk.7.ffn_down_exps.weight`).
    """

    buffer: str
    layers: tuple[int, ...] = ()
    tensors: tuple[str, ...] = ()

    def patterns(self) -> list[tuple[str, str]]:
        pats = [(layer_experts_pattern(i), self.buffer) for i in self.layers]
        pats.extend((expert_tensor_pattern(t), self.buffer) for t in self.tensors)
        return pats


@dataclass(frozen=True)
class Placement:
    """Which tensors live on which device.

    `n_gpu_layers` follows llama.cpp: -1 means every layer (and the output layer) on the
    GPU when the build has one; on a CPU-only build everything is on the CPU anyway.
    Routed experts of the layers in `expert_cpu_layers` (or of every layer with
    `cpu_moe_all`) and the single tensors in `expert_cpu_tensors` are kept in system RAM
    and computed by the CPU. `extra_overrides` are raw `(pattern, buffer type)` pairs as
    given to `-ot`, applied after qwenrun's own patterns.

    Several devices:
    - `rpc_workers`: "host:port" endpoints of `qwenrun worker`s, checked and registered with
      llama.cpp before the load (`engine/rpc.py`); their devices then list as RPC0, RPC1, …
    - `devices`: the devices that take the offloaded layers, in order
      (`llama_model_params.devices`); device or buffer type names, never "CPU" (this
      machine's CPU holds the first layers that are not offloaded: `n_gpu_layers`). Empty:
      llama.cpp's own choice, every GPU with the workers' devices first.
    - `tensor_split`: the share of the offloaded layers each of `devices` takes, in that
      order; llama.cpp gives each device one contiguous block (see `layer_devices`). Whole
      layer counts split exactly; `layer_blocks` builds all three from blocks.
      Empty: in proportion to each device's free memory, as llama.cpp decides.
    - `expert_homes`: routed experts of given layers or single tensors on a named buffer
      type, e.g. a worker's CPU; applied after the CPU ones above, before `extra_overrides`.
      A device an expert home names that is not among `devices` is added to them with no
      layers (llama.cpp only computes on the devices of the model).
    """

    n_gpu_layers: int = -1
    cpu_moe_all: bool = False
    expert_cpu_layers: tuple[int, ...] = ()
    expert_cpu_tensors: tuple[str, ...] = ()
    extra_overrides: tuple[tuple[str, str], ...] = ()
    rpc_workers: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    expert_homes: tuple[ExpertHome, ...] = ()

    @classmethod
    def n_cpu_moe(cls, n: int, n_gpu_layers: int = -1) -> Placement:
        """`--n-cpu-moe N`: the routed experts of blocks 0..N-1 on the CPU."""
        return cls(n_gpu_layers=n_gpu_layers, expert_cpu_layers=tuple(range(max(0, n))))

    @classmethod
    def layer_blocks(
        cls,
        n_layer: int,
        blocks: Sequence[tuple[str, int]],
        *,
        rpc_workers: Sequence[str] = (),
        expert_homes: Sequence[ExpertHome] = (),
    ) -> Placement:
        """Contiguous blocks of layers, first to last: `[("CPU", 4), ("RPC0[h:p]", 20),
        ("CUDA0", 24)]` puts layers 0-3 on this machine's CPU, 4-23 on the worker's first
        device and 24-47 (with the output layer) on the local GPU.

        A "CPU" block can only come first (llama.cpp keeps the first layers it does not
        offload on the CPU); the counts must add up to `n_layer`.
        """
        counts = [(name, n) for name, n in blocks if n > 0]
        if any(n < 0 for _, n in blocks):
            raise errors.UsageError("a block of layers cannot have a negative size")
        if sum(n for _, n in counts) != n_layer:
            raise errors.UsageError(
                f"the blocks hold {sum(n for _, n in counts)} layers, the model has {n_layer}"
            )
        on_cpu = counts[0][1] if counts and counts[0][0].upper() == "CPU" else 0
        offloaded = counts[1:] if on_cpu else counts
        if any(name.upper() == "CPU" for name, _ in offloaded):
            raise errors.UsageError(
                "layers on this machine's CPU can only be the first block",
                hint="llama.cpp offloads the last layers and keeps the first ones on the CPU",
            )
        split = [float(n) for _, n in offloaded]
        if split:
            split[-1] += 1  # the output layer goes with the last block
        placement = cls(
            n_gpu_layers=n_layer - on_cpu + 1 if offloaded else 0,
            rpc_workers=tuple(rpc_workers),
            devices=tuple(name for name, _ in offloaded),
            tensor_split=tuple(split),
            expert_homes=tuple(expert_homes),
        )
        placement.validate()
        return placement

    def validate(self) -> None:
        """What can be checked without llama.cpp (names are checked at load time)."""
        if len(set(self.devices)) != len(self.devices):
            raise errors.UsageError(f"a device is listed twice in {', '.join(self.devices)}")
        if any(d.upper() == "CPU" for d in self.devices):
            raise errors.UsageError(
                "the CPU cannot be one of the devices that take offloaded layers",
                hint="this machine's CPU keeps the first layers that are not offloaded "
                "(n_gpu_layers); a worker's CPU is named by its buffer type, RPCn[host:port]",
            )
        if self.tensor_split:
            if len(self.tensor_split) != len(self.devices):
                raise errors.UsageError(
                    f"tensor_split has {len(self.tensor_split)} shares for "
                    f"{len(self.devices)} devices",
                    hint="give one share per device, in the order of the devices",
                )
            if any(x < 0 for x in self.tensor_split) or sum(self.tensor_split) <= 0:
                raise errors.UsageError("tensor_split needs shares of 0 or more, not all 0")
        homed = [i for h in self.expert_homes for i in h.layers]
        homed += list(self.expert_cpu_layers)
        if len(set(homed)) != len(homed):
            twice = sorted({i for i in homed if homed.count(i) > 1})
            raise errors.UsageError(
                f"the experts of {layer_ranges(twice)} are given more than one home"
            )
        if self.cpu_moe_all and self.expert_homes:
            raise errors.UsageError(
                "every routed expert is on the CPU already: expert homes would never apply"
            )

    def all_devices(self) -> tuple[str, ...]:
        """`devices`, then the devices expert homes name that are not among them (with no
        layers: `tensor_split` gets a 0 for each). "CPU" is never one of them."""
        extra = [
            h.buffer
            for h in self.expert_homes
            if h.buffer.upper() != "CPU" and h.buffer not in self.devices
        ]
        return (*self.devices, *dict.fromkeys(extra))

    def all_shares(self) -> tuple[float, ...]:
        """`tensor_split` padded with zeros for `all_devices()` (empty if not given)."""
        if not self.tensor_split:
            return ()
        return (*self.tensor_split, *[0.0] * (len(self.all_devices()) - len(self.devices)))

    def layer_devices(self, n_layer: int) -> tuple[str, ...] | None:
        """Where llama.cpp puts each block and then the output layer: "CPU" or a device name.

        llama-model.cpp (`load_tensors`): the first n_layer+1-n_gpu_layers layers stay on the
        CPU; offloaded layer j of n goes to the first device whose running share is above
        j/n. None when that depends on free memory (no `tensor_split` given).
        """
        if self.n_gpu_layers == 0:
            return ("CPU",) * (n_layer + 1)
        if not self.tensor_split:
            return None
        shares = self.all_shares()
        total = sum(shares)
        bounds, run = [], 0.0
        for x in shares:
            run += x
            bounds.append(run / total)
        n_gpu = n_layer + 1 if self.n_gpu_layers < 0 else min(self.n_gpu_layers, n_layer + 1)
        start = n_layer + 1 - n_gpu
        out = []
        for il in range(n_layer + 1):
            if il < start:
                out.append("CPU")
                continue
            at = (il - start) / n_gpu
            i = next((k for k, b in enumerate(bounds) if b > at), len(bounds) - 1)
            out.append(self.all_devices()[i])
        return tuple(out)

    def override_patterns(self) -> list[tuple[str, str]]:
        """The `(pattern, buffer type name)` list handed to llama.cpp, in priority order."""
        pats: list[tuple[str, str]] = []
        if self.cpu_moe_all:
            pats.append((EXPS_REGEX, "CPU"))
        else:  # this machine's RAM, as an expert home that comes first
            home = ExpertHome("CPU", self.expert_cpu_layers, self.expert_cpu_tensors)
            pats.extend(home.patterns())
        for home in self.expert_homes:
            pats.extend(home.patterns())
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
        for home in self.expert_homes:
            if home.layers:
                parts.append(f"experts of {layer_ranges(home.layers)} on {home.buffer}")
            if home.tensors:
                parts.append(f"{len(home.tensors)} expert tensors on {home.buffer}")
        if self.devices:
            shares = ":".join(f"{x:g}" for x in self.tensor_split)
            parts.append(
                f"layers over {', '.join(self.devices)}" + (f" ({shares})" if shares else "")
            )
        if self.rpc_workers:
            parts.append(f"workers {', '.join(self.rpc_workers)}")
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


# The logits llama.cpp keeps room for per batch (`llama_context_params.n_outputs_max`). The
# engine samples only the last token of each batch (`llama_batch_get_one` marks only it as an
# output), so one is enough; llama.cpp's default (n_batch) reserves n_ubatch × n_vocab f32 of
# logits in the compute buffer, 1.9 GiB at Qwen3.5's vocabulary and 2,048-token micro-batches.
# A batch asking for more outputs than this aborts in llama.cpp (`output_reserve`'s assert).
N_OUTPUTS_MAX = 1


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
    `lazy_table` is where a tensor llama.cpp can read lazily (Qwen3.8-Flash-Next's n-gram
    table, `per_layer_token_embd`) lives: False reads it whole at load (in RAM: the page cache
    with mmap, the process's own memory without), True leaves it in the file and reads the
    rows a token needs (`llama_model_params.lazy_mode`; mapped even with mmap off), None is
    llama.cpp's own choice (lazy above 4 GiB). Models without such a tensor ignore it.
    `n_outputs_max` is the logits llama.cpp keeps room for per batch (`N_OUTPUTS_MAX`, what
    the planner counts; 0 is llama.cpp's default, n_batch, for measuring the difference).
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
    lazy_table: bool | None = None
    n_outputs_max: int = N_OUTPUTS_MAX

    def mmap_enabled(self) -> bool:
        if self.use_mmap is not None:
            return self.use_mmap
        return not self.placement.overrides_to_cpu
