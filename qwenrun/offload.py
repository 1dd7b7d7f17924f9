"""The offload planner's face: what the user wants (`Wishes`) in, a `Plan` or why not out.

Contract: `plan(quants, hw, wishes, spec)` is pure. From the candidate quants of one model
(each with its GGUF tensor list: exact bytes from a local header, or the recipe's estimate),
a `HardwareProfile` value and the user's `Wishes`, it returns the `Plan` of the best-quality
quant that fits, with its `LoadConfig`, bytes per device, predicted speed and the reasons in
words; or raises `DoesNotFitError` saying what the smallest option needs, what the machine
has, and the nearest options that do fit. `Wishes.validate` is the one check of the user's
settings, with one rule per setting; every command goes through it. The planner's insides
live in `planner/`: the facts of a GGUF (`facts`), what llama.cpp allocates (`costs`), how
fast it runs (`speed`), quant recipes and estimates (`recipes`), the search (`search`) and
the words (`explain`). `plan_for_file` (a local GGUF's header) and `plan_for_spec` (a catalog
model, offline) are the two conveniences that read anything.

Rules (each stated in the plan's reasons when it matters):

- User settings are constraints, not an off switch: a fixed quant, context, KV type,
  `--cpu-moe`, `--n-cpu-moe` or GPU layer count is kept and everything else is fitted
  around it; `--threads` is passed on.
- Quality first: quants are tried best first on `catalog.QUANT_LADDER`; the first that fits
  wins, preferring one with 16,384 tokens of context or more. Within a quant the context
  comes next, and speed last (`planner/search.py` says how).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qwenrun import catalog, errors, hwprobe
from qwenrun.engine.loadconfig import KV_TYPES, LoadConfig, Placement
from qwenrun.hub import names
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner import explain
from qwenrun.planner.costs import CpuMoeFrom, DeviceBytes, Layout, usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.search import (
    MIN_CTX,
    PREFERRED_MIN_CTX,
    Budget,
    Fit,
    cannot_fit,
    cpu_moe_order,
    fit_option,
    fixed_cpu_moe,
)
from qwenrun.planner.speed import cpu_bandwidth, gpu_bandwidth, predict

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.hub.header import GGUFInfo

Prefer = Literal["quality", "balanced", "speed"]

# How `--prefer balanced` (the default) trades quality for speed: the best quant that decodes
# at BALANCED_SHARE of the fastest 4-bit-class quant's speed or more, or at BALANCED_ENOUGH_TOK_S
# (past that, answers come faster than anyone reads, and quality is worth more than speed).
BALANCED_SHARE = 0.8
BALANCED_ENOUGH_TOK_S = 40.0
# The 4-bit class: the smallest quants whose answers stay close to the full model's; below it
# quality drops faster than speed grows, so `speed` never goes there on its own.
FOUR_BIT = (
    "UD-Q4_K_XL",
    "Q4_K_L",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "IQ4_NL",
    "UD-IQ4_XS",
    "IQ4_XS",
    "Q4_0",
    "MXFP4_MOE",
)
_FOUR_BIT_FLOOR = max(catalog.quant_rank(q) for q in FOUR_BIT)

# The smallest context anyone may ask for: llama.cpp pads contexts to 256 cells, and a
# chat template alone takes dozens of tokens.
MIN_USER_CTX = 256


# --------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Wishes:
    """What the user fixed. None (or False) means "choose for me"."""

    quant: str | None = None
    n_ctx: int | None = None
    kv_type: str | None = None
    cpu_moe: bool = False  # every layer's routed experts on the CPU
    n_cpu_moe: int | None = None  # N layers' routed experts on the CPU (the first N alone)
    cpu_moe_from: CpuMoeFrom | None = None  # which layers' experts: "first" or "last" N
    n_gpu_layers: int | None = None
    threads: int | None = None
    prefer: Prefer = "balanced"  # how to weigh quality against speed when choosing the quant
    gpu_mem_bytes: int | None = None  # plan for a GPU of this size (0: no GPU)
    ram_bytes: int | None = None  # plan for this much RAM

    def validate(self) -> None:
        """The one check of the user's settings; each message names the flag."""
        if self.n_ctx is not None and self.n_ctx < MIN_USER_CTX:
            raise errors.UsageError(
                f"--ctx {self.n_ctx} is too small", hint=f"use at least {MIN_USER_CTX}"
            )
        if self.kv_type is not None and self.kv_type.lower() not in KV_TYPES:
            raise errors.UsageError(
                f"unknown KV cache type {self.kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}"
            )
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise errors.UsageError(
                "--cpu-moe and --n-cpu-moe both set",
                hint="--cpu-moe puts every layer's experts on the CPU; pick one",
            )
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise errors.UsageError("--n-cpu-moe must be 0 or more")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise errors.UsageError("--gpu-layers must be -1 (all) or more")
        if self.cpu_moe_from is not None and self.cpu_moe_from not in ("first", "last"):
            raise errors.UsageError(
                f"--cpu-moe-from {self.cpu_moe_from!r} is not a choice",
                hint="first (llama.cpp's --n-cpu-moe) or last (llama.cpp's --fit)",
            )
        if self.threads is not None and self.threads < 1:
            raise errors.UsageError("--threads must be 1 or more")
        if self.prefer not in ("quality", "balanced", "speed"):
            raise errors.UsageError(
                f"--prefer {self.prefer!r} is not a choice", hint="quality, balanced or speed"
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
        if self.cpu_moe:
            out.append("--cpu-moe")
        if self.n_cpu_moe is not None:
            out.append(f"--n-cpu-moe {self.n_cpu_moe}")
        if self.cpu_moe_from is not None:
            out.append(f"--cpu-moe-from {self.cpu_moe_from}")
        if self.n_gpu_layers is not None:
            out.append(f"--gpu-layers {self.n_gpu_layers}")
        if self.kv_type:
            out.append(f"--kv-type {self.kv_type}")
        return out


@dataclass(frozen=True)
class QuantOption:
    """One quant of the model: its tensors, the files that hold it, their total size.

    `source` is the quant's GGUF header, or a function that makes it (a catalog estimate):
    then it is made only when the search reaches this quant.
    """

    name: str
    source: GGUFInfo | Callable[[], GGUFInfo]
    files: tuple[str, ...] = ()
    size_bytes: int = 0  # download size; 0: the tensor bytes
    local: bool = False  # a file on disk: the quant is what it is, not a choice
    # A catalog estimate: its facts come from `facts_source` (a cache) without the header.
    estimate: bool = False
    facts_source: Callable[[], ModelFacts] | None = None

    @property
    def total_bytes(self) -> int:
        return self.size_bytes or self.facts.file_bytes

    @property
    def estimated(self) -> bool:
        return self.estimate or self.info.estimated

    @functools.cached_property
    def info(self) -> GGUFInfo:
        return self.source() if callable(self.source) else self.source

    @functools.cached_property
    def facts(self) -> ModelFacts:
        """The planner's condensed view of the tensors, computed once per option."""
        if self.facts_source is not None:
            return self.facts_source()
        return ModelFacts.from_info(self.info)


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
    # What the user asked for that was clamped or is risky: shown even without --verbose.
    warnings: tuple[str, ...] = ()
    # The search's own terms for the placement (which run of layers, the boundary tensors),
    # for `qwenrun bench` to try its neighbours.
    layout: Layout | None = None

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
            "n_threads": self.load.n_threads,
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
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------
# plan()


def _apply_wishes(hw: HardwareProfile, wishes: Wishes) -> HardwareProfile:
    return hwprobe.with_memory(hw, gpu_bytes=wishes.gpu_mem_bytes, ram_bytes=wishes.ram_bytes)


def _ordered(quants: Sequence[QuantOption], wishes: Wishes) -> list[QuantOption]:
    if not quants:
        raise errors.ModelNotFoundError("no quant to plan for", hint="check the model name")
    # Best first; the bigger file first within a rank (size as listed: no header is read).
    options = sorted(quants, key=lambda q: (catalog.quant_rank(q.name), -q.size_bytes))
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
    measured: Sequence[MeasuredPlacement] = (),
) -> Plan:
    """The best plan for this model on this machine (see the module docstring).

    `measured` are placements `qwenrun bench` measured for this very file here: the fastest
    one that fits is preferred to the search's pick (unless the user fixed the placement).
    """
    wishes = wishes or Wishes()
    wishes.validate()
    hw = _apply_wishes(hw, wishes)
    budget = Budget.from_hw(hw)
    name = spec.display if spec is not None else None
    ordered = _ordered(quants, wishes)
    named: dict[int, ModelFacts] = {}

    def facts_of(i: int) -> ModelFacts:
        # Only for the quants the search reaches: facts are the costly part of planning.
        if i not in named:
            opt = ordered[i]
            named[i] = replace(opt.facts, name=name or _model_name(opt))
        return named[i]

    # A context of PREFERRED_MIN_CTX or more comes before quality; below it, quality first.
    passes = (PREFERRED_MIN_CTX, MIN_CTX) if wishes.n_ctx is None else (MIN_CTX,)
    smallest = _hopeless(ordered, facts_of, budget, wishes)
    if smallest is not None:
        raise explain.does_not_fit(smallest, hw, budget, wishes, spec, _replan(quants, hw, spec))
    for least in passes:
        rejected: list[tuple[QuantOption, ModelFacts]] = []
        fitting: list[_Candidate] = []
        for i, opt in enumerate(ordered):
            if fitting and not _worth_trying(opt, fitting, wishes):
                break
            facts = facts_of(i)
            fit = fit_option(facts, budget, wishes, _repack_flags(hw), least)
            if fit is None:
                if not fitting:
                    rejected.append((opt, facts))
                continue
            decode = predict(facts, fit.layout, fit.use, hw, budget.has_gpu).decode_tok_s
            fitting.append(_Candidate(opt, facts, fit, decode))
        if fitting:
            chosen, why = _choose(fitting, wishes)
            fit, wishes_now, note = _prefer_measured(chosen, measured, budget, wishes, hw)
            plan_ = _make_plan(
                chosen.opt, chosen.facts, fit, hw, budget, wishes_now, rejected, least, why
            )
            return replace(plan_, reasons=(*plan_.reasons, note)) if note else plan_
    raise explain.does_not_fit(rejected, hw, budget, wishes, spec, _replan(quants, hw, spec))


# Catalog quants are sized from their recipes: the lowest-ranked are the smallest. When even
# they cannot fit, neither can the rest, and the others' estimates need not be made.
_SMALLEST_TO_CHECK = 3


def _hopeless(
    ordered: list[QuantOption],
    facts_of: Callable[[int], ModelFacts],
    budget: Budget,
    wishes: Wishes,
) -> list[tuple[QuantOption, ModelFacts]] | None:
    """The smallest catalog quants, when they cannot fit at any context; else None."""
    if len(ordered) <= _SMALLEST_TO_CHECK or any(q.size_bytes or q.local for q in ordered):
        return None  # listed or local quants have real sizes: the search is cheap anyway
    kv = (wishes.kv_type or "f16").lower()
    last = range(len(ordered) - _SMALLEST_TO_CHECK, len(ordered))
    smallest = [(ordered[i], facts_of(i)) for i in last]
    for _opt, facts in smallest:
        ctx = wishes.n_ctx or min(facts.ctx_native or MIN_CTX, MIN_CTX)
        if not cannot_fit(facts, ctx, kv, budget):
            return None
    return smallest


@dataclass(frozen=True)
class MeasuredPlacement:
    """A placement `qwenrun bench` measured for one model file on this machine."""

    label: str
    n_gpu_layers: int
    n_cpu_moe: int
    cpu_moe_from: CpuMoeFrom
    cpu_tensors: tuple[str, ...]
    n_ubatch: int
    use_gpu: bool
    threads: int | None
    use_mmap: bool | None
    decode_tok_s: float  # the median of its runs
    runs: int


def _prefer_measured(
    chosen: _Candidate,
    measured: Sequence[MeasuredPlacement],
    budget: Budget,
    wishes: Wishes,
    hw: HardwareProfile,
) -> tuple[Fit, Wishes, str | None]:
    """The measured-fastest placement that fits now, in place of the search's pick."""
    placed_by_user = (
        wishes.cpu_moe
        or wishes.n_cpu_moe is not None
        or wishes.n_gpu_layers is not None
        or wishes.cpu_moe_from is not None
    )
    fit = chosen.fit
    if not measured or placed_by_user:
        return fit, wishes, None
    for m in sorted(measured, key=lambda m: -m.decode_tok_s):
        if m.use_gpu != fit.layout.use_gpu:
            continue
        layout = replace(
            fit.layout,
            n_gpu_layers=m.n_gpu_layers,
            n_cpu_moe=m.n_cpu_moe,
            cpu_moe_from=m.cpu_moe_from,
            cpu_tensors=m.cpu_tensors,
            n_ubatch=m.n_ubatch,
            n_batch=max(fit.layout.n_batch, m.n_ubatch),
            use_mmap=m.use_mmap,
        )
        use = usage(chosen.facts, layout, _repack_flags(hw))
        if not budget.fits(use):
            continue
        threads = wishes.threads if wishes.threads is not None else m.threads
        note = (
            f"placement measured fastest by `qwenrun bench` on this machine: {m.label} "
            f"(median {m.decode_tok_s:.1f} tok/s over {m.runs} runs)"
        )
        return Fit(layout, use, fit.ctx_reason), replace(wishes, threads=threads), note
    return fit, wishes, None


@dataclass(frozen=True)
class _Candidate:
    opt: QuantOption
    facts: ModelFacts
    fit: Fit
    decode_tok_s: float


def _worth_trying(opt: QuantOption, fitting: list[_Candidate], wishes: Wishes) -> bool:
    """Whether a worse quant can still be chosen, once a better one fits: only down to the
    end of the 4-bit class, and only when the preference weighs speed at all."""
    if wishes.prefer == "quality" or wishes.quant:
        return False
    return catalog.quant_rank(opt.name) <= _FOUR_BIT_FLOOR


def _choose(fitting: list[_Candidate], wishes: Wishes) -> tuple[_Candidate, str | None]:
    """The quant `--prefer` asks for among those that fit (best quality first), and why, in
    words, when it is not simply the best that fits."""
    best = fitting[0]
    four_bit = [c for c in fitting if catalog.quant_rank(c.opt.name) <= _FOUR_BIT_FLOOR]
    if wishes.prefer == "quality" or len(fitting) == 1 or not four_bit:
        return best, None
    fastest = max(four_bit, key=lambda c: c.decode_tok_s)
    if wishes.prefer == "speed":
        chosen = fastest
        why = "the fastest quant of 4-bit class or better (--prefer speed)"
    else:
        floor = min(BALANCED_SHARE * fastest.decode_tok_s, BALANCED_ENOUGH_TOK_S)
        chosen = next(c for c in fitting if c.decode_tok_s >= floor or c is fastest)
        why = (
            f"the best quant that decodes at {BALANCED_SHARE:.0%} of the fastest 4-bit "
            f"quant's speed ({fastest.opt.name}, ≈ {fastest.decode_tok_s:.0f} tok/s) or at "
            f"{BALANCED_ENOUGH_TOK_S:.0f} tok/s"
        )
    if chosen is best:
        return best, None
    why = (
        f"{chosen.opt.name} (≈ {chosen.decode_tok_s:.0f} tok/s) is {why}; the best quant that "
        f"fits, {best.opt.name}, would decode at ≈ {best.decode_tok_s:.0f} tok/s "
        "(--prefer quality takes it)"
    )
    return chosen, why


def _model_name(opt: QuantOption) -> str:
    value = opt.info.get("general.name", None)
    if value:
        return str(value)
    if opt.files:
        return Path(opt.files[0]).name
    return opt.info.arch


def _repack_flags(hw: HardwareProfile) -> frozenset[str]:
    """The CPU flags llama.cpp's repacking goes by; none when its extra buffer types are off."""
    return hw.cpu_flags if hw.extra_bufts else frozenset()


def _replan(
    quants: Sequence[QuantOption], hw: HardwareProfile, spec: ModelSpec | None
) -> explain.Replan:
    """For the does-not-fit hint: what a relaxed wish would give, in a few words."""

    def attempt(wishes: Wishes) -> str | None:
        try:
            p = plan(quants, hw, wishes, spec)
        except errors.DoesNotFitError:
            return None
        return f"{p.quant} at context {p.n_ctx:,}, about {p.decode_tok_s:.0f} tok/s"

    return attempt


# --------------------------------------------------------------------------------------
# Building the Plan


def _make_plan(
    opt: QuantOption,
    facts: ModelFacts,
    fit: Fit,
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    rejected: list[tuple[QuantOption, ModelFacts]],
    least_ctx: int,
    chosen_because: str | None,
) -> Plan:
    layout, use = fit.layout, fit.use
    warnings = _clamped(facts, wishes, hw)
    threads = wishes.threads
    if threads is not None and hw.logical_cores and threads > hw.logical_cores:
        threads = hw.logical_cores
    load = load_config(facts, layout, replace(wishes, threads=threads), hw.extra_bufts)
    gpu_bw = gpu_bandwidth(hw)
    cpu_bw, cpu_bw_note = cpu_bandwidth(hw)
    sp = predict(facts, fit.layout, fit.use, hw, budget.has_gpu, load.n_threads)
    gpu_dev = None
    if layout.use_gpu:
        gpu_dev = DevicePlan(
            "gpu", " + ".join(budget.gpu_names), use.gpu, budget.gpu_capacity, budget.gpu_reserved
        )
    cpu_dev = DevicePlan(
        "cpu", hw.cpu_model or "CPU", use.cpu, budget.ram_capacity, budget.ram_reserved
    )
    gpu_expert_layers = use.gpu_expert_layers if layout.use_gpu else 0
    reasons = explain.reasons(
        opt, facts, fit, hw, budget, wishes, rejected, load, sp, (gpu_bw, cpu_bw, cpu_bw_note)
    )
    if wishes.n_ctx is None and least_ctx < PREFERRED_MIN_CTX:
        reasons.insert(1, f"no quant fits with {PREFERRED_MIN_CTX:,} tokens of context or more")
    if chosen_because:
        reasons[0] = chosen_because
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
        estimated=opt.estimated,
        reasons=tuple(reasons),
        arch=facts.arch,
        repack_bytes=use.cpu.repack if load.mmap_enabled() else 0,
        warnings=tuple(warnings),
        layout=layout,
    )


def _clamped(facts: ModelFacts, wishes: Wishes, hw: HardwareProfile) -> list[str]:
    """Settings the user gave that the model or machine cannot honour as written."""
    out = []
    if wishes.n_cpu_moe is not None and facts.is_moe and wishes.n_cpu_moe > facts.n_layer:
        out.append(
            f"--n-cpu-moe {wishes.n_cpu_moe:,} is more than the model's {facts.n_layer} "
            "layers: every layer's routed experts go to the CPU"
        )
    if wishes.threads is not None and hw.logical_cores and wishes.threads > hw.logical_cores:
        out.append(
            f"--threads {wishes.threads:,} is more than this machine's {hw.logical_cores} "
            f"CPU threads: using {hw.logical_cores}"
        )
    if wishes.n_ctx is not None and facts.ctx_native and wishes.n_ctx > facts.ctx_native:
        out.append(
            f"--ctx {wishes.n_ctx:,} is beyond the {facts.ctx_native:,} tokens the model was "
            "trained for: answers may degrade past that point"
        )
    return out


def load_config(facts: ModelFacts, layout: Layout, wishes: Wishes, extra_bufts: bool) -> LoadConfig:
    if not layout.use_gpu:
        # Everything runs on the CPU anyway; expert flags still go to llama.cpp as given, as
        # its own `--cpu-moe` / `--n-cpu-moe` would (they also turn memory-mapping off).
        fixed = fixed_cpu_moe(facts, wishes) if facts.is_moe else None
        placement = Placement(
            n_gpu_layers=0,
            cpu_moe_all=wishes.cpu_moe and facts.is_moe,
            expert_cpu_layers=tuple(
                Layout(0, n_cpu_moe=fixed, cpu_moe_from=cpu_moe_order(wishes)).cpu_expert_layers(
                    facts.n_layer
                )
            )
            if fixed and not wishes.cpu_moe
            else (),
        )
    elif facts.is_moe and layout.n_cpu_moe >= facts.n_layer and not layout.cpu_tensors:
        placement = Placement(n_gpu_layers=layout.n_gpu_layers, cpu_moe_all=True)
    else:
        placement = Placement(
            n_gpu_layers=layout.n_gpu_layers,
            expert_cpu_layers=tuple(layout.cpu_expert_layers(facts.n_layer))
            if facts.is_moe
            else (),
            expert_cpu_tensors=layout.cpu_tensors,
        )
    return LoadConfig(
        placement=placement,
        n_ctx=layout.n_ctx,
        kv_type=layout.kv_type,
        n_ubatch=layout.n_ubatch,
        n_batch=max(layout.n_batch, layout.n_ubatch),
        n_threads=wishes.threads,
        extra_bufts=extra_bufts,
        use_mmap=layout.use_mmap,
    )


# --------------------------------------------------------------------------------------
# A local file


def quant_name_for(info: GGUFInfo, path: str | Path) -> str:
    """The quant a GGUF holds: from its file name (`…-UD-Q4_K_XL.gguf`), else its file type,
    else the type holding most of its weight bytes (`F32`, `Q8_0`)."""
    named = names.parse_quant(str(path)) or info.file_type
    if named:
        return named.removeprefix("ALL_")  # llama.cpp's ftype of a float file is ALL_F32
    by_type: dict[str, int] = {}
    for t in info.tensors:
        if len(t.shape) >= 2:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
    return max(by_type, key=lambda k: by_type[k]) if by_type else "unknown"


def plan_for_file(
    path: str | Path,
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    measured: Sequence[MeasuredPlacement] = (),
) -> Plan:
    """Read a local GGUF (all shards) and plan it: exact bytes from its header."""
    from qwenrun.hub import header

    info = header.read_local(path)
    if info.arch not in catalog.QWEN_ARCHES:
        raise errors.UnsupportedModelError(
            f"{Path(path).name}: architecture {info.arch!r} is not one qwenrun plans for",
            hint=f"qwenrun runs Qwen GGUFs: {', '.join(catalog.QWEN_ARCHES)}",
        )
    files = tuple(info.files) or (str(path),)
    size = sum(Path(f).stat().st_size for f in files if Path(f).exists())
    option = QuantOption(quant_name_for(info, path), info, files, size, local=True)
    # The file is the quant: a --quant wish cannot choose another one here.
    return plan([option], hw, replace(wishes or Wishes(), quant=None), measured=measured)


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
    """Quants of `spec` with estimated tensor lists (no network); quants without a size
    recipe are left out (they cannot be planned before download)."""
    out = []
    for q in quants:
        option = _catalog_option(spec, q)
        if option is not None:
            out.append(option)
    return out


@functools.lru_cache(maxsize=512)
def _catalog_option(spec: ModelSpec, quant: str) -> QuantOption | None:
    """One estimated quant, kept for the process: probe, the default model and the
    does-not-fit alternatives plan the same catalog quants again and again."""
    from qwenrun.planner import factcache, recipes

    if not recipes.has_recipe(quant, spec.shape.arch):
        return None
    make = functools.partial(recipes.estimate, spec, quant)
    return QuantOption(
        quant,
        make,
        estimate=True,
        facts_source=functools.partial(
            factcache.cached_facts, spec, quant, lambda: ModelFacts.from_info(make())
        ),
    )


def plan_for_spec(
    spec: ModelSpec,
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    quants: Sequence[str] = OFFLINE_QUANTS,
) -> Plan:
    """Plan a catalog model before anything is downloaded, from its shapes and the recipes
    of `quants` (by default unsloth's set; a repo listing's quants when choosing a pull)."""
    wanted = list(quants)
    if wishes is not None and wishes.quant:
        want = catalog.normalize_quant(wishes.quant)
        if want not in wanted:
            wanted.append(want)  # any quant with a size recipe can be asked for
    return plan(options_for_spec(spec, wanted), hw, wishes, spec)


def plan_catalog(hw: HardwareProfile) -> list[tuple[ModelSpec, Plan | errors.DoesNotFitError]]:
    """The best plan of every catalog model on `hw`, or why it does not fit."""
    out: list[tuple[ModelSpec, Plan | errors.DoesNotFitError]] = []
    for spec in catalog.CATALOG:
        try:
            out.append((spec, plan_for_spec(spec, hw)))
        except errors.DoesNotFitError as err:
            out.append((spec, err))
    return out
