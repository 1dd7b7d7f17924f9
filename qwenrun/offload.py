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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrun import catalog, errors, hwprobe
from qwenrun.engine.loadconfig import KV_TYPES, LoadConfig, Placement
from qwenrun.hub import names
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner import explain
from qwenrun.planner.costs import DeviceBytes, Layout
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.search import (
    MIN_CTX,
    PREFERRED_MIN_CTX,
    Budget,
    Fit,
    fit_option,
    fixed_cpu_moe,
)
from qwenrun.planner.speed import Speed, cpu_bandwidth, gpu_bandwidth, predict

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.hub.header import GGUFInfo

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
    n_cpu_moe: int | None = None  # the first N layers' routed experts on the CPU
    n_gpu_layers: int | None = None
    threads: int | None = None
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
        if self.threads is not None and self.threads < 1:
            raise errors.UsageError("--threads must be 1 or more")
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
            fit = fit_option(facts, budget, wishes, hw.cpu_flags, least)
            if fit is not None:
                return _make_plan(opt, facts, fit, hw, budget, wishes, rejected, least, options)
            rejected.append((opt, facts))
    raise explain.does_not_fit(rejected, hw, budget, wishes, spec, _replan(quants, hw))


def _model_name(opt: QuantOption) -> str:
    value = opt.info.get("general.name", None)
    if value:
        return str(value)
    if opt.files:
        return Path(opt.files[0]).name
    return opt.info.arch


def _replan(quants: Sequence[QuantOption], hw: HardwareProfile) -> explain.Replan:
    """For the does-not-fit hint: what a relaxed wish would give, in a few words."""

    def attempt(wishes: Wishes) -> str | None:
        try:
            p = plan(quants, hw, wishes)
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
    options: list[tuple[QuantOption, ModelFacts]],
) -> Plan:
    layout, use = fit.layout, fit.use
    load = _load_config(facts, layout, wishes)
    gpu_bw = gpu_bandwidth(hw)
    cpu_bw, cpu_bw_note = cpu_bandwidth(hw)
    sp = predict(facts, fit.layout, fit.use, hw, budget.has_gpu)
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
        fit = fit_option(facts, budget, wishes, hw.cpu_flags, least_ctx)
        if fit is None:
            continue
        faster = predict(facts, fit.layout, fit.use, hw, budget.has_gpu).decode_tok_s
        if faster >= 1.4 * sp.decode_tok_s:
            return [f"for speed: --quant {opt.name} would decode ≈ {faster:.0f} tok/s"]
        return []
    return []


def _load_config(facts: ModelFacts, layout: Layout, wishes: Wishes) -> LoadConfig:
    if not layout.use_gpu:
        # Everything runs on the CPU anyway; expert flags still go to llama.cpp as given, as
        # its own `--cpu-moe` / `--n-cpu-moe` would (they also turn memory-mapping off).
        fixed = fixed_cpu_moe(facts, wishes) if facts.is_moe else None
        placement = Placement(
            n_gpu_layers=0,
            cpu_moe_all=wishes.cpu_moe and facts.is_moe,
            expert_cpu_layers=tuple(range(fixed)) if fixed and not wishes.cpu_moe else (),
        )
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
        n_threads=wishes.threads,
    )


# --------------------------------------------------------------------------------------
# A local file


def quant_name_for(info: GGUFInfo, path: str | Path) -> str:
    """The quant a GGUF holds: from its file name (`…-UD-Q4_K_XL.gguf`), else its file type."""
    return names.parse_quant(str(path)) or info.file_type or "unknown"


def plan_for_file(path: str | Path, hw: HardwareProfile, wishes: Wishes | None = None) -> Plan:
    """Read a local GGUF (all shards) and plan it: exact bytes from its header."""
    from qwenrun.hub import header

    info = header.read_local(path)
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
    """Quants of `spec` with estimated tensor lists (no network); quants without a size
    recipe are left out (they cannot be planned before download)."""
    from qwenrun.planner import recipes

    out = []
    for q in quants:
        try:
            out.append(QuantOption(q, recipes.estimate(spec, q)))
        except errors.UsageError:
            continue
    return out


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
