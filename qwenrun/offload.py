"""The offload planner: which quant, which context, which layers' experts on the CPU.

Contract: `plan(quants, hw, wishes, spec)` is pure. From the candidate quants of one model
(each with its GGUF tensor list: exact bytes from a local header, or the catalog's
estimate), a `HardwareProfile` value and the user's `Wishes`, it returns the `Plan` of the
best-quality quant that fits, with its `LoadConfig`, bytes per device, predicted speed and
the reasons in words; or raises `DoesNotFitError` saying what the smallest option needs,
what the machine has, and the nearest options that do fit. What llama.cpp allocates for a
layout is `memmodel.py`'s business; this module searches layouts. `plan_for_file` is the
one convenience here that reads a file (a GGUF header, through `gguf_info`).

Rules (each stated in the plan's reasons when it matters):

- User settings are constraints, not an off switch: a fixed quant, context, `--n-cpu-moe`,
  GPU layer count or KV type is kept and everything else is fitted around it.
- Quality first: quants are tried best first on `catalog.QUANT_LADDER`; the first that fits
  wins. Within a quant, the context comes next: the model's native context capped at
  `DEFAULT_CTX_CAP` (32,768: enough for long chats and most documents, a quarter or less of
  the KV cache of a 128k+ context), halved while it does not fit, never below `MIN_CTX`
  (4,096) unless the user asks. When every expert already sits on the GPU the context grows
  (doubling, up to the native one) as long as it still fits there.
- Speed last: attention, norms, router, shared experts and the output layer on the GPU;
  routed experts on the GPU for as many layers as fit, the first N layers' experts on the
  CPU (llama.cpp's `--n-cpu-moe N`), then the VRAM left over filled with single expert
  tensors of the last CPU layer (as llama.cpp's own fitter does). Only when even that does
  not fit do whole layers leave the GPU (fewer `n_gpu_layers`).
- GPU budget: free VRAM minus `CUDA_CONTEXT_BYTES` (CUDA context, cuBLAS workspace: not in
  llama.cpp's buffer logs) and `GPU_MARGIN_BYTES` (what llama.cpp's `--fit` leaves) per GPU.
  Several GPUs are pooled (llama.cpp splits layers by free memory).
- RAM budget: what is available now minus the OS's share, max(2 GiB, 10 % of RAM). Swap
  never counts: weights paged out to disk would run at disk speed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrun import catalog, config, errors, hwprobe
from qwenrun.hwprobe import HardwareProfile
from qwenrun.memmodel import (
    GIB,
    KV_TYPE_SIZES,
    MIB,
    DeviceBytes,
    Layout,
    ModelFacts,
    Speed,
    Usage,
    pad_ctx,
    speed,
    usage,
)
from qwenrun.placement import LoadConfig, Placement, layer_ranges

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.gguf_info import GGUFInfo

DEFAULT_CTX_CAP = 32768
PREFERRED_MIN_CTX = 16384
MIN_CTX = config.MIN_CTX
CUDA_CONTEXT_BYTES = 512 * MIB
GPU_MARGIN_BYTES = 1 * GIB
OS_RESERVE_MIN_BYTES = 2 * GIB
OS_RESERVE_FRACTION = 0.10
N_UBATCH = LoadConfig().n_ubatch


# --------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Wishes:
    """What the user fixed. None means "choose for me"."""

    quant: str | None = None
    n_ctx: int | None = None
    n_cpu_moe: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str | None = None
    gpu_mem_bytes: int | None = None  # plan for a GPU of this size (0: no GPU)
    ram_bytes: int | None = None  # plan for this much RAM

    def validate(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 16:
            raise errors.UsageError(f"context {self.n_ctx} is too small", hint="use at least 512")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise errors.UsageError("--n-cpu-moe must be 0 or more")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise errors.UsageError("--gpu-layers must be -1 (all) or more")
        if self.kv_type is not None and self.kv_type.lower() not in KV_TYPE_SIZES:
            raise errors.UsageError(
                f"unknown KV cache type {self.kv_type!r}",
                hint=f"use one of {', '.join(KV_TYPE_SIZES)}",
            )
        for flag, value in (("--gpu-mem", self.gpu_mem_bytes), ("--ram", self.ram_bytes)):
            if value is not None and value < 0:
                raise errors.UsageError(f"{flag} cannot be negative")

    def constraints(self) -> list[str]:
        """The fixed settings, as the flags that set them."""
        out = []
        if self.quant:
            out.append(f"--quant {self.quant}")
        if self.n_ctx is not None:
            out.append(f"--ctx {self.n_ctx}")
        if self.n_cpu_moe is not None:
            out.append(f"--n-cpu-moe {self.n_cpu_moe}")
        if self.n_gpu_layers is not None:
            out.append(f"--gpu-layers {self.n_gpu_layers}")
        if self.kv_type:
            out.append(f"--kv-type {self.kv_type}")
        return out


@dataclass(frozen=True)
class QuantOption:
    """One quant of the model: its tensors, the files that hold it, their total size."""

    name: str
    info: GGUFInfo
    files: tuple[str, ...] = ()
    size_bytes: int = 0  # download size; 0: the tensor bytes

    @property
    def total_bytes(self) -> int:
        return self.size_bytes or sum(t.n_bytes for t in self.info.tensors)


@dataclass(frozen=True)
class Budget:
    """How much of the machine a plan may use."""

    gpu_capacity: int
    gpu_reserved: int
    ram_capacity: int
    ram_reserved: int
    n_gpus: int
    gpu_names: tuple[str, ...] = ()

    @property
    def has_gpu(self) -> bool:
        return self.n_gpus > 0

    @property
    def gpu(self) -> int:
        return max(0, self.gpu_capacity - self.gpu_reserved)

    @property
    def ram(self) -> int:
        return max(0, self.ram_capacity - self.ram_reserved)

    @classmethod
    def from_hw(cls, hw: HardwareProfile) -> Budget:
        gpus = hw.gpus if hw.has_gpu else ()
        capacity = sum(g.free_bytes or max(0, g.total_bytes - g.used_bytes) for g in gpus)
        available = hw.ram_available_bytes or hw.ram_total_bytes
        return cls(
            gpu_capacity=capacity,
            gpu_reserved=len(gpus) * (CUDA_CONTEXT_BYTES + GPU_MARGIN_BYTES),
            ram_capacity=min(hw.ram_total_bytes, available),
            ram_reserved=os_reserve(hw.ram_total_bytes),
            n_gpus=len(gpus),
            gpu_names=tuple(g.name for g in gpus),
        )

    def fits(self, use: Usage) -> bool:
        return use.gpu.used <= self.gpu and use.cpu.used <= self.ram


def os_reserve(ram_total: int) -> int:
    """RAM left to the OS and other programs on top of what they use now."""
    return max(OS_RESERVE_MIN_BYTES, int(ram_total * OS_RESERVE_FRACTION))


# --------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # "gpu" | "cpu"
    name: str
    bytes: DeviceBytes
    capacity: int  # free VRAM / available RAM
    reserved: int  # CUDA context + margin / the OS's share

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserved)

    def to_dict(self) -> dict[str, Any]:
        b = self.bytes
        return {
            "device": self.kind,
            "name": self.name,
            "weights_dense": b.weights_dense,
            "weights_experts": b.weights_experts,
            "kv": b.kv,
            "recurrent_state": b.rs,
            "compute": b.compute,
            "output": b.output,
            "used": b.used,
            "reserved": self.reserved,
            "capacity": self.capacity,
            "budget": self.budget,
        }


@dataclass(frozen=True)
class Plan:
    model: str
    quant: str
    files: tuple[str, ...]
    size_bytes: int
    load: LoadConfig
    cpu: DevicePlan
    gpu: DevicePlan | None
    n_layer: int
    gpu_expert_layers: int  # trunk layers whose routed experts all sit on the GPU
    native_ctx: int
    decode_tok_s: float
    prefill_tok_s: float
    estimated: bool
    reasons: tuple[str, ...]
    prefill_rough: bool = True
    arch: str = ""
    repack_bytes: int = 0  # reported by llama.cpp as CPU_REPACK on top of CPU_Mapped

    @property
    def n_ctx(self) -> int:
        return self.load.n_ctx

    @property
    def cpu_expert_layers(self) -> int:
        return self.n_layer - self.gpu_expert_layers

    def predicted_buffers(self) -> dict[tuple[str, str], int]:
        """Bytes per (kind, device) as llama.cpp's load log reports them ("model", "CPU")."""
        out: dict[tuple[str, str], int] = {}
        for dev, name in ((self.cpu, "CPU"), (self.gpu, "GPU")):
            if dev is None:
                continue
            b = dev.bytes
            model = b.weights + (self.repack_bytes if name == "CPU" else 0)
            for kind, n in (
                ("model", model),
                ("kv", b.kv),
                ("rs", b.rs),
                ("compute", b.compute),
                ("output", b.output),
            ):
                if n:
                    out[(kind, name)] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        p = self.load.placement
        return {
            "model": self.model,
            "arch": self.arch,
            "quant": self.quant,
            "files": list(self.files),
            "size_bytes": self.size_bytes,
            "estimated": self.estimated,
            "n_ctx": self.load.n_ctx,
            "native_ctx": self.native_ctx,
            "kv_type": self.load.kv_type,
            "n_batch": self.load.n_batch,
            "n_ubatch": self.load.n_ubatch,
            "n_gpu_layers": p.n_gpu_layers,
            "n_layer": self.n_layer,
            "cpu_moe_all": p.cpu_moe_all,
            "expert_cpu_layers": list(p.expert_cpu_layers),
            "expert_cpu_tensors": list(p.expert_cpu_tensors),
            "gpu_expert_layers": self.gpu_expert_layers,
            "cpu_expert_layers": self.cpu_expert_layers,
            "override_patterns": [{"pattern": a, "buffer": b} for a, b in p.override_patterns()],
            "use_mmap": self.load.mmap_enabled(),
            "devices": [d.to_dict() for d in (self.gpu, self.cpu) if d is not None],
            "predicted": {
                "decode_tok_s": round(self.decode_tok_s, 2),
                "prefill_tok_s": round(self.prefill_tok_s, 1),
                "prefill_rough": self.prefill_rough,
            },
            "reasons": list(self.reasons),
        }


# --------------------------------------------------------------------------------------
# Sizes


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": GIB, "k": 1 << 10, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes from `24GiB`, `24G`, `24GB`, `512M`, `1.5T` or a bare `24` (GiB).

    Memory is sold in binary units (a "24 GB" card holds 24 GiB), so GB and GiB both mean
    2^30 bytes here. `0` means none.
    """
    m = _SIZE_RE.match(text)
    if not m or (m.group(3) and not m.group(2)):
        raise errors.UsageError(
            f"cannot read {flag} {text!r}",
            hint="give a size such as 24GiB, 12G or 512M (a bare number means GiB; 0 means none)",
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: int | float) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


# --------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class _Fit:
    layout: Layout
    use: Usage
    ctx_reason: str


def _ctx_candidates(facts: ModelFacts, wishes: Wishes, least: int) -> list[int]:
    """Contexts to try, largest first: the capped native one, halving down to `least`."""
    if wishes.n_ctx is not None:
        return [wishes.n_ctx]
    native = facts.ctx_native or DEFAULT_CTX_CAP
    target = min(native, DEFAULT_CTX_CAP)
    floor = min(native, least)
    out = [target]
    c = target
    while c // 2 >= floor:
        c //= 2
        out.append(c)
    if out[-1] != floor:
        out.append(floor)
    return out


def _fits(facts: ModelFacts, layout: Layout, budget: Budget, flags: frozenset[str]) -> Usage | None:
    use = usage(facts, layout, flags)
    return use if budget.fits(use) else None


def _smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest x in [lo, hi] with ok(x), for a predicate false then true; None if none."""
    if lo > hi or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _place(
    facts: ModelFacts, base: Layout, budget: Budget, wishes: Wishes, flags: frozenset[str]
) -> tuple[Layout, Usage] | None:
    """The fastest layout at this context: most experts on the GPU, then whole layers.

    GPU use falls as experts (or whole layers) leave it, so both searches are bisections.
    """
    if not base.use_gpu:
        use = _fits(facts, base, budget, flags)
        return (base, use) if use else None
    ngl = wishes.n_gpu_layers
    first = replace(base, n_gpu_layers=-1 if ngl is None else ngl)
    found = _place_experts(facts, first, budget, wishes, flags)
    if found is not None or ngl is not None:
        return found
    # Even with every routed expert on the CPU the GPU is too small: whole layers leave it,
    # the first ones first (llama.cpp keeps the last n_gpu_layers - 1 blocks and the output).
    n_cpu_moe = facts.n_layer if wishes.n_cpu_moe is None else wishes.n_cpu_moe
    trunk = replace(base, n_cpu_moe=n_cpu_moe)
    top = facts.n_layer_all

    def gpu_fits(k: int) -> bool:  # k = n_gpu_layers: the output layer and k - 1 blocks
        return usage(facts, replace(trunk, n_gpu_layers=k), flags).gpu.used <= budget.gpu

    dropped = _smallest(0, top - 1, lambda j: gpu_fits(top - j))
    if dropped is None:
        # Not even the output layer fits: the GPU cannot help this model.
        cpu_only = replace(base, use_gpu=False, n_gpu_layers=0, n_cpu_moe=0)
        use = _fits(facts, cpu_only, budget, flags)
        return (cpu_only, use) if use else None
    layout = replace(trunk, n_gpu_layers=top - dropped)
    use = _fits(facts, layout, budget, flags)
    return (layout, use) if use else None


def _place_experts(
    facts: ModelFacts, base: Layout, budget: Budget, wishes: Wishes, flags: frozenset[str]
) -> tuple[Layout, Usage] | None:
    if wishes.n_cpu_moe is not None or not facts.is_moe:
        fixed = replace(base, n_cpu_moe=min(wishes.n_cpu_moe or 0, facts.n_layer))
        fixed_use = _fits(facts, fixed, budget, flags)
        return (fixed, fixed_use) if fixed_use else None

    def gpu_fits(n: int) -> bool:
        return usage(facts, replace(base, n_cpu_moe=n), flags).gpu.used <= budget.gpu

    n = _smallest(0, facts.n_layer, gpu_fits)
    if n is None:
        return None
    layout = replace(base, n_cpu_moe=n)
    use = _fits(facts, layout, budget, flags)
    if use is None:
        return None  # RAM is the limit: more experts on the CPU only makes it worse
    if n > 0:
        return _fill_boundary(facts, layout, use, budget, flags)
    return layout, use


def _fill_boundary(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """Move single expert tensors of the last CPU layer back to the GPU while they fit."""
    layer = layout.n_cpu_moe - 1
    tensors = sorted(facts.expert_tensors[layer], key=lambda t: -t.n_bytes)
    on_cpu = [t.name for t in tensors]
    best = (layout, use)
    for t in tensors:
        trial = [name for name in on_cpu if name != t.name]
        candidate = replace(layout, n_cpu_moe=layer, cpu_tensors=tuple(trial))
        found = _fits(facts, candidate, budget, flags)
        if found is not None:
            on_cpu = trial
            best = (candidate, found)
    return best


def _fit_option(
    facts: ModelFacts,
    budget: Budget,
    wishes: Wishes,
    flags: frozenset[str],
    least_ctx: int = MIN_CTX,
) -> _Fit | None:
    kv = (wishes.kv_type or "f16").lower()
    use_gpu = budget.has_gpu and wishes.n_gpu_layers != 0
    candidates = _ctx_candidates(facts, wishes, least_ctx)
    for i, ctx in enumerate(candidates):
        if _cannot_fit(facts, ctx, kv, budget):
            continue
        base = Layout(n_ctx=pad_ctx(ctx), kv_type=kv, use_gpu=use_gpu, n_ubatch=N_UBATCH)
        if not use_gpu:
            base = replace(base, n_gpu_layers=0)
        found = _place(facts, base, budget, wishes, flags)
        if found is None:
            continue
        layout, use = found
        if wishes.n_ctx is not None:
            why = "as asked"
        elif i == 0:
            layout, use = _grow_ctx(facts, layout, use, budget, flags)
            why = _ctx_default_reason(facts, layout.n_ctx)
        else:
            why = f"the largest that fits (tried {candidates[0]:,} first)"
        return _Fit(layout, use, why)
    return None


def _cannot_fit(facts: ModelFacts, ctx: int, kv: str, budget: Budget) -> bool:
    """A quick lower bound: weights and caches alone exceed VRAM and RAM together."""
    need = facts.weight_bytes + facts.kv_bytes(ctx, kv) + facts.rs_bytes
    return need > budget.gpu + budget.ram


def _ctx_default_reason(facts: ModelFacts, n_ctx: int) -> str:
    native = facts.ctx_native
    if native and n_ctx >= native:
        return "the model's native context"
    if n_ctx > DEFAULT_CTX_CAP:
        return f"grown past {DEFAULT_CTX_CAP:,} because the whole model fits on the GPU"
    suffix = f" of the model's native {native:,}" if native else ""
    return f"qwenrun's default cap{suffix}; --ctx asks for more"


def _grow_ctx(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """With every expert on the GPU, double the context while everything still fits there."""
    all_on_gpu = (
        layout.use_gpu
        and layout.n_cpu_moe == 0
        and not layout.cpu_tensors
        and layout.n_gpu_layers < 0
    )
    native = facts.ctx_native
    while all_on_gpu and native and layout.n_ctx < native:
        bigger = replace(layout, n_ctx=min(native, layout.n_ctx * 2))
        found = _fits(facts, bigger, budget, flags)
        if found is None:
            break
        layout, use = bigger, found
    return layout, use


# --------------------------------------------------------------------------------------
# plan()


def _apply_wishes(hw: HardwareProfile, wishes: Wishes) -> HardwareProfile:
    return hwprobe.with_memory(hw, gpu_bytes=wishes.gpu_mem_bytes, ram_bytes=wishes.ram_bytes)


def _ordered(quants: Sequence[QuantOption], wishes: Wishes) -> list[QuantOption]:
    if not quants:
        raise errors.ModelNotFoundError("no quant to plan for", hint="check the model name")
    options = sorted(quants, key=lambda q: (catalog.quant_rank(q.name), -q.total_bytes))
    if wishes.quant:
        want = catalog.normalize_quant(wishes.quant)
        options = [q for q in options if catalog.normalize_quant(q.name) == want]
        if not options:
            have = ", ".join(
                q.name for q in sorted(quants, key=lambda q: catalog.quant_rank(q.name))
            )
            raise errors.UsageError(
                f"quant {wishes.quant} is not available for this model", hint=f"choose from {have}"
            )
    return options


def plan(
    quants: Sequence[QuantOption],
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    spec: ModelSpec | None = None,
) -> Plan:
    """The best plan for this model on this machine (see the module docstring)."""
    wishes = wishes or Wishes()
    wishes.validate()
    hw = _apply_wishes(hw, wishes)
    budget = Budget.from_hw(hw)
    name = spec.display if spec is not None else None
    options = [
        (opt, ModelFacts.from_info(opt.info, name or _model_name(opt)))
        for opt in _ordered(quants, wishes)
    ]
    # A context of PREFERRED_MIN_CTX or more comes before quality; below it, quality first.
    passes = (PREFERRED_MIN_CTX, MIN_CTX) if wishes.n_ctx is None else (MIN_CTX,)
    for least in passes:
        rejected: list[tuple[QuantOption, ModelFacts]] = []
        for opt, facts in options:
            fit = _fit_option(facts, budget, wishes, hw.cpu_flags, least)
            if fit is not None:
                return _make_plan(opt, facts, fit, hw, budget, wishes, rejected, least, options)
            rejected.append((opt, facts))
    raise _does_not_fit(quants, rejected, hw, budget, wishes, spec)


def _model_name(opt: QuantOption) -> str:
    value = opt.info.get("general.name", None)
    if value:
        return str(value)
    if opt.files:
        return Path(opt.files[0]).name
    return opt.info.arch


# --------------------------------------------------------------------------------------
# Building the Plan and its reasons


def _make_plan(
    opt: QuantOption,
    facts: ModelFacts,
    fit: _Fit,
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    rejected: list[tuple[QuantOption, ModelFacts]],
    least_ctx: int,
    options: list[tuple[QuantOption, ModelFacts]],
) -> Plan:
    layout, use = fit.layout, fit.use
    load = _load_config(facts, layout)
    gpu_bw = _gpu_bandwidth(hw)
    cpu_bw, cpu_bw_note = _cpu_bandwidth(hw)
    sp = _speed_of(facts, fit, hw, budget)
    gpu_dev = None
    if layout.use_gpu:
        gpu_dev = DevicePlan(
            "gpu", " + ".join(budget.gpu_names), use.gpu, budget.gpu_capacity, budget.gpu_reserved
        )
    cpu_dev = DevicePlan(
        "cpu", hw.cpu_model or "CPU", use.cpu, budget.ram_capacity, budget.ram_reserved
    )
    gpu_expert_layers = use.gpu_expert_layers if layout.use_gpu else 0
    reasons = _reasons(
        opt, facts, fit, hw, budget, wishes, rejected, load, sp, (gpu_bw, cpu_bw, cpu_bw_note)
    )
    if wishes.n_ctx is None and least_ctx < PREFERRED_MIN_CTX:
        reasons.insert(1, f"no quant fits with {PREFERRED_MIN_CTX:,} tokens of context or more")
    if not wishes.quant:
        reasons.extend(_faster_option(opt, sp, options, hw, budget, wishes, least_ctx))
    return Plan(
        model=facts.name,
        quant=opt.name,
        files=opt.files,
        size_bytes=opt.total_bytes,
        load=load,
        cpu=cpu_dev,
        gpu=gpu_dev,
        n_layer=facts.n_layer,
        gpu_expert_layers=gpu_expert_layers if facts.is_moe else 0,
        native_ctx=facts.ctx_native,
        decode_tok_s=sp.decode_tok_s,
        prefill_tok_s=sp.prefill_tok_s,
        estimated=bool(getattr(opt.info, "estimated", False)),
        reasons=tuple(reasons),
        arch=facts.arch,
        repack_bytes=use.cpu.repack if load.mmap_enabled() else 0,
    )


def _speed_of(facts: ModelFacts, fit: _Fit, hw: HardwareProfile, budget: Budget) -> Speed:
    gpu0 = hw.gpus[0] if budget.has_gpu else None
    return speed(
        facts,
        fit.layout,
        fit.use,
        gpu_bandwidth_gbs=_gpu_bandwidth(hw),
        cpu_bandwidth_gbs=_cpu_bandwidth(hw)[0],
        gpu_cc=gpu0.compute_capability if gpu0 else None,
        pcie=gpu0.pcie if gpu0 else None,
        cores=hw.physical_cores,
        cpu_flags=hw.cpu_flags,
    )


# Quality first can mean slow: when the chosen quant decodes below SLOW_TOK_S, the plan
# names the best 4-bit-class quant if it would run markedly faster (the user decides).
SLOW_TOK_S = 15.0
FOUR_BIT = ("UD-Q4_K_XL", "Q4_K_L", "Q4_K_M", "Q4_K_S", "UD-IQ4_XS", "IQ4_XS", "IQ4_NL")


def _faster_option(
    chosen: QuantOption,
    sp: Speed,
    options: list[tuple[QuantOption, ModelFacts]],
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    least_ctx: int,
) -> list[str]:
    if sp.decode_tok_s >= SLOW_TOK_S:
        return []
    rank = catalog.quant_rank(chosen.name)
    for opt, facts in options:
        name = catalog.normalize_quant(opt.name)
        if name not in FOUR_BIT or catalog.quant_rank(name) <= rank:
            continue
        fit = _fit_option(facts, budget, wishes, hw.cpu_flags, least_ctx)
        if fit is None:
            continue
        faster = _speed_of(facts, fit, hw, budget).decode_tok_s
        if faster >= 1.4 * sp.decode_tok_s:
            return [f"for speed: --quant {opt.name} would decode ≈ {faster:.0f} tok/s"]
        return []
    return []


def _load_config(facts: ModelFacts, layout: Layout) -> LoadConfig:
    if not layout.use_gpu:
        placement = Placement(n_gpu_layers=0)
    elif facts.is_moe and layout.n_cpu_moe >= facts.n_layer and not layout.cpu_tensors:
        placement = Placement(n_gpu_layers=layout.n_gpu_layers, cpu_moe_all=True)
    else:
        placement = Placement(
            n_gpu_layers=layout.n_gpu_layers,
            expert_cpu_layers=tuple(range(layout.n_cpu_moe)) if facts.is_moe else (),
            expert_cpu_tensors=layout.cpu_tensors,
        )
    return LoadConfig(
        placement=placement,
        n_ctx=layout.n_ctx,
        kv_type=layout.kv_type,
        n_ubatch=layout.n_ubatch,
    )


def _gpu_bandwidth(hw: HardwareProfile) -> float:
    known = [g.mem_bandwidth_gbs for g in hw.gpus if g.mem_bandwidth_gbs]
    if not known:
        return hwprobe.HYPOTHETICAL_GPU_BANDWIDTH_GBS
    return sum(known) / len(known)


def _cpu_bandwidth(hw: HardwareProfile) -> tuple[float, str]:
    if hw.cpu_bandwidth_gbs:
        gbs = hw.cpu_bandwidth_gbs
        source = hw.cpu_bandwidth_source
    else:
        gbs, source = hwprobe.default_cpu_bandwidth(hw.cpu_model, hw.physical_cores)
    if source == "measured":
        return gbs, "measured"
    return gbs, "a conservative default; `qwenrun probe --measure` measures it"


def _reasons(
    opt: QuantOption,
    facts: ModelFacts,
    fit: _Fit,
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    rejected: list[tuple[QuantOption, ModelFacts]],
    load: LoadConfig,
    sp: Speed,
    bandwidth: tuple[float, float, str],
) -> list[str]:
    layout, use = fit.layout, fit.use
    gpu_bw, cpu_bw, cpu_bw_note = bandwidth
    out: list[str] = []
    if wishes.quant:
        out.append(f"quant {opt.name}, as asked")
    elif rejected:
        better = ", ".join(f"{q.name} ({fmt_bytes(f.weight_bytes)})" for q, f in rejected[:3])
        more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
        out.append(f"{opt.name} is the best quant that fits; better ones do not: {better}{more}")
        if wishes.n_ctx is None and fit.layout.n_ctx >= PREFERRED_MIN_CTX:
            out[-1] += f" (with {PREFERRED_MIN_CTX:,} tokens of context or more)"
    else:
        out.append(f"{opt.name} is the best quant on offer, and it fits")
    out.append(f"context {layout.n_ctx:,} tokens: {fit.ctx_reason}")
    out.append(_machine_reason(hw, budget))
    out.extend(_placement_reasons(facts, layout, use, budget, hw))
    out.append(_cache_reason(facts, layout))
    out.append(_speed_reason(layout, sp, gpu_bw, cpu_bw, cpu_bw_note))
    if layout.use_gpu and not load.mmap_enabled():
        out.append("memory-mapping off: llama.cpp advises it when tensors are moved to the CPU")
    if layout.n_ctx > (facts.ctx_native or layout.n_ctx):
        out.append(f"context beyond the native {facts.ctx_native:,}: answers may degrade")
    if getattr(opt.info, "estimated", False):
        out.append(
            "sizes are estimated from the catalog's shapes and the quant's recipe; "
            "the downloaded file's header gives the exact bytes"
        )
    return out


def _machine_reason(hw: HardwareProfile, budget: Budget) -> str:
    ram = f"{fmt_bytes(budget.ram)} of RAM (after leaving the OS {fmt_bytes(budget.ram_reserved)})"
    if budget.has_gpu:
        return (
            f"memory to plan with: {fmt_bytes(budget.gpu)} of VRAM (after "
            f"{fmt_bytes(budget.gpu_reserved)} for the CUDA context and a safety margin) and {ram}"
        )
    why = "no GPU"
    if hw.gpus and hw.gpu_offload is False:
        why = "this llama.cpp build cannot use the GPU"
    return f"{why}: everything runs on the CPU with {ram}"


def _placement_reasons(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, hw: HardwareProfile
) -> list[str]:
    if not layout.use_gpu:
        out = ["all weights memory-mapped in RAM (n_gpu_layers 0)"]
        if budget.has_gpu:
            out.append("the GPU is left unused: it cannot hold even the output layer and buffers")
        return out
    out = []
    n = facts.n_layer
    if use.first_gpu_layer > 0:
        out.append(
            f"layers 0-{use.first_gpu_layer - 1} stay wholly on the CPU: "
            "the GPU cannot hold their attention weights as well"
        )
    if facts.is_moe:
        on_gpu = use.gpu_expert_layers
        if layout.n_cpu_moe == 0 and not layout.cpu_tensors:
            out.append(f"every layer's routed experts on the GPU ({n} layers)")
        else:
            cpu_layers = list(range(layout.n_cpu_moe))
            text = f"routed experts of {layer_ranges(cpu_layers)} on the CPU" if cpu_layers else ""
            if layout.cpu_tensors:
                part = (
                    f"{len(layout.cpu_tensors)} expert tensor(s) of layer {layout.n_cpu_moe} "
                    "too (the rest of that layer fills the VRAM left over)"
                )
                text = f"{text}, and {part}" if text else f"routed experts: {part} on the CPU"
            out.append(f"{text}; the other {on_gpu} layers' experts on the GPU")
    out.append(
        "attention, norms, router"
        + (", shared experts" if facts.has_shared_expert else "")
        + " and the output layer on the GPU; the token embeddings stay on the CPU "
        "(llama.cpp always keeps the input layer there)"
    )
    if budget.n_gpus > 1:
        out.append(
            f"{budget.n_gpus} GPUs planned as one pool; llama.cpp splits layers by free memory"
        )
    return out


def _cache_reason(facts: ModelFacts, layout: Layout) -> str:
    kv = facts.kv_bytes(layout.n_ctx, layout.kv_type)
    attn = len(facts.attn_layers)
    text = f"KV cache {fmt_bytes(kv)} ({layout.kv_type}"
    if facts.is_hybrid:
        text += (
            f", only the {attn} attention layers of {facts.n_layer}; the other "
            f"{len(facts.recr_layers)} keep a fixed {fmt_bytes(facts.rs_bytes)} recurrent state)"
        )
    else:
        text += f", {attn} layers)"
    return text


def _speed_reason(layout: Layout, sp: Speed, gpu_bw: float, cpu_bw: float, note: str) -> str:
    parts = [f"predicted decode ≈ {sp.decode_tok_s:.0f} tok/s:"]
    if layout.use_gpu:
        parts.append(
            f"{sp.gpu_bytes_per_token / 1e9:.2f} GB per token from VRAM at {gpu_bw:.0f} GB/s,"
        )
    parts.append(
        f"{sp.cpu_bytes_per_token / 1e9:.2f} GB from RAM at {cpu_bw:.0f} GB/s ({note});"
        f" prefill ≈ {sp.prefill_tok_s:.0f} tok/s (rough)"
    )
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# When nothing fits


class ModelDoesNotFit(errors.DoesNotFitError):
    """`DoesNotFitError` with the two numbers behind it, for tables."""

    def __init__(
        self,
        message: str,
        hint: str | None,
        alternatives: tuple[str, ...],
        need_bytes: int,
        have_bytes: int,
    ) -> None:
        super().__init__(message, hint, alternatives)
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes


def _does_not_fit(
    quants: Sequence[QuantOption],
    rejected: list[tuple[QuantOption, ModelFacts]],
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    spec: ModelSpec | None,
) -> ModelDoesNotFit:
    opt, facts = min(rejected, key=lambda r: r[1].weight_bytes)
    ctx = wishes.n_ctx or min(facts.ctx_native or MIN_CTX, MIN_CTX)
    kv = (wishes.kv_type or "f16").lower()
    need = usage(facts, Layout(n_ctx=pad_ctx(ctx), kv_type=kv, use_gpu=False), hw.cpu_flags)
    have = budget.ram + budget.gpu
    machine = f"{fmt_bytes(budget.ram)} of RAM"
    if budget.has_gpu:
        machine = f"{fmt_bytes(budget.gpu)} of VRAM + {machine} ({fmt_bytes(have)})"
    message = (
        f"{facts.name} does not fit: its smallest option ({opt.name}, context {ctx:,}) needs "
        f"about {fmt_bytes(need.cpu.used)} (weights {fmt_bytes(facts.weight_bytes)}); this "
        f"machine can give {machine}"
    )
    if wishes.constraints():
        message += f" with {' '.join(wishes.constraints())}"
    alternatives = _alternatives(quants, hw, wishes, spec, facts, have)
    hint = (
        "try " + "; or ".join(alternatives)
        if alternatives
        else f"this needs a machine with about {fmt_bytes(need.cpu.used - have)} more memory"
    )
    return ModelDoesNotFit(message, hint, tuple(alternatives), need.cpu.used, have)


def _alternatives(
    quants: Sequence[QuantOption],
    hw: HardwareProfile,
    wishes: Wishes,
    spec: ModelSpec | None,
    smallest: ModelFacts,
    have: int,
) -> list[str]:
    """The nearest changes that do fit, best first."""
    out: list[str] = []
    relaxations: list[tuple[str, Wishes]] = []
    if wishes.quant:
        relaxations.append(("another quant", replace(wishes, quant=None)))
    if wishes.n_ctx is not None and wishes.n_ctx > MIN_CTX:
        relaxations.append((f"--ctx {MIN_CTX}", replace(wishes, n_ctx=MIN_CTX)))
    if wishes.n_cpu_moe is not None:
        label = f"without --n-cpu-moe {wishes.n_cpu_moe}"
        relaxations.append((label, replace(wishes, n_cpu_moe=None)))
    if wishes.n_gpu_layers is not None:
        label = f"without --gpu-layers {wishes.n_gpu_layers}"
        relaxations.append((label, replace(wishes, n_gpu_layers=None)))
    if (wishes.kv_type or "f16").lower() in ("f16", "bf16", "f32"):
        label = "--kv-type q8_0 (half the KV cache)"
        relaxations.append((label, replace(wishes, kv_type="q8_0")))
    for label, relaxed in relaxations:
        found = _first_fit(quants, hw, relaxed)
        if found is not None:
            out.append(f"{label}: {found}")
    if spec is not None:
        out.extend(_smaller_models(spec, smallest, have))
    return out


def _first_fit(quants: Sequence[QuantOption], hw: HardwareProfile, wishes: Wishes) -> str | None:
    try:
        p = plan(quants, hw, wishes)
    except errors.DoesNotFitError:
        return None
    return f"{p.quant} at context {p.n_ctx:,}, about {p.decode_tok_s:.0f} tok/s"


def _smaller_models(spec: ModelSpec, smallest: ModelFacts, have: int) -> list[str]:
    """Smaller models of the family whose same-quant weights would fit (a rough scale-down)."""
    if spec.params_total <= 0:
        return []
    per_param = smallest.weight_bytes / (spec.params_total * 1e9)
    seen: set[tuple[float, float]] = set()
    out = []
    for other in sorted(catalog.CATALOG, key=lambda s: -s.params_total):
        key = (other.params_total, other.params_active)
        if other.params_total >= spec.params_total or key in seen:
            continue
        need = other.params_total * 1e9 * per_param * 1.15 + 1 * GIB
        if need <= have:
            seen.add(key)
            out.append(f"the smaller {other.name} (about {fmt_bytes(need)} in all)")
        if len(out) == 2:
            break
    return out


# --------------------------------------------------------------------------------------
# A local file


def quant_name_for(info: GGUFInfo, path: str | Path) -> str:
    """The quant a GGUF holds: from its file name (`…-UD-Q4_K_XL.gguf`), else its file type."""
    return catalog.parse_quant_from_filename(str(path)) or info.file_type or "unknown"


def plan_for_file(path: str | Path, hw: HardwareProfile, wishes: Wishes | None = None) -> Plan:
    """Read a local GGUF (all shards) and plan it: exact bytes from its header."""
    from qwenrun import gguf_info

    if not Path(path).exists():
        raise errors.ModelNotFoundError(
            f"model file not found: {path}", hint="check the path, or `qwenrun list`"
        )
    info = gguf_info.read_local(path)
    files = tuple(info.files) or (str(path),)
    size = sum(Path(f).stat().st_size for f in files if Path(f).exists())
    option = QuantOption(quant_name_for(info, path), info, files, size)
    # The file is the quant: a --quant wish cannot choose another one here.
    return plan([option], hw, replace(wishes or Wishes(), quant=None))


# --------------------------------------------------------------------------------------
# A catalog model (offline: estimated sizes)


# The quants planned offline: unsloth's set, because every catalog model has an unsloth repo
# and these are what it publishes (catalog.md §2.1). Full precision is left out: it is never
# the fast choice and rarely a download anyone wants.
OFFLINE_QUANTS: tuple[str, ...] = (
    "UD-Q8_K_XL",
    "Q8_0",
    "UD-Q6_K_XL",
    "Q6_K",
    "UD-Q5_K_XL",
    "Q5_K_M",
    "UD-Q4_K_XL",
    "Q4_K_M",
    "UD-IQ4_XS",
    "UD-Q3_K_XL",
    "Q3_K_M",
    "UD-IQ3_XXS",
    "UD-Q2_K_XL",
    "UD-IQ2_M",
    "UD-IQ2_XXS",
    "UD-IQ1_M",
    "UD-IQ1_S",
)


def options_for_spec(spec: ModelSpec, quants: Sequence[str] = OFFLINE_QUANTS) -> list[QuantOption]:
    """Quants of `spec` with estimated tensor lists (no network)."""
    from qwenrun import gguf_info

    return [QuantOption(q, gguf_info.estimate(spec, q)) for q in quants]


def plan_for_spec(spec: ModelSpec, hw: HardwareProfile, wishes: Wishes | None = None) -> Plan:
    """Plan a catalog model before anything is downloaded, from its shapes."""
    quants = list(OFFLINE_QUANTS)
    if wishes is not None and wishes.quant:
        want = catalog.normalize_quant(wishes.quant)
        if want not in quants:
            quants.append(want)  # any quant with a size recipe can be asked for
    return plan(options_for_spec(spec, quants), hw, wishes, spec)
