"""The plan of one model on one machine: candidate quants in, a `Plan` or why not out.

Contract: pure. `plan(quants, hw, wishes, spec, measured)` takes the candidate quants of one
model (`QuantOption`s: exact bytes from a header, or a catalog estimate), a `HardwareProfile`
value, the user's `Wishes` and what `qwenrun bench` measured for this file here, and returns the
`Plan` of the quant the preference chooses among those that fit (`policy`), placed by the search
(`search`; `spread` over several devices), priced (`costs`; `speed`, or `spreadspeed` for a
spread), explained (`explain`); or raises `DoesNotFitError` saying what the smallest option
needs, what the machine has, and the nearest options that do fit. `load_config` turns a searched
`Layout` into the engine's `LoadConfig` (a spread's into one block of layers per device and the
workers to register: `spread_placement`); `planned_threads` is the thread count every plan uses.

Rules (each stated in the plan's reasons when it matters):

- User settings are constraints, not an off switch: a fixed quant, context, KV type,
  `--cpu-moe`, `--n-cpu-moe` or GPU layer count is kept and everything else is fitted
  around it; `--threads` is passed on (default: the physical cores, as decoding is bound by
  memory, not by hyper-threads).
- A context of `PREFERRED_MIN_CTX` tokens or more comes before quality; below it, quality
  first. Within a quant the context comes next, and speed last.
- A placement `qwenrun bench` measured replaces the search's pick only by the rule of
  `measured.py` (clearly faster than the pick's own measurement, beyond the spread).
- An n-gram table (Qwen3.8-Flash-Next) is read into RAM when it fits beside everything else,
  else left in the file (`--ngram-table` fixes either); the plan says where and why
  (`Plan.ngram_table`), the speed counts the disk's reads, and the `LoadConfig` sets
  llama.cpp's `lazy_mode` to match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun import errors
from qwenrun.engine.loadconfig import ExpertHome, LoadConfig, Placement
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner import explain, policy
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, Spread, Usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.measured import MeasuredPlacement, prefer_measured
from qwenrun.planner.options import QuantOption
from qwenrun.planner.result import DevicePlan, Plan
from qwenrun.planner.search import MIN_CTX, PREFERRED_MIN_CTX, Fit, cannot_fit, fit_option
from qwenrun.planner.speed import Speed, cpu_bandwidth, gpu_bandwidth, predict, with_table_reads
from qwenrun.planner.spreadspeed import predict_spread
from qwenrun.planner.wishes import Wishes, cpu_moe_order, fixed_cpu_moe, planned_machine

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec


def speed_of(
    facts: ModelFacts, layout: Layout, use: Usage, hw: HardwareProfile, threads: int | None = None
) -> Speed:
    """The predicted speed of a placement: one GPU and the CPU, or a spread (with an n-gram
    table's reads from the disk, when it is left there)."""
    if layout.spread is not None:
        sp = predict_spread(facts, layout, hw, threads)
    else:
        sp = predict(facts, layout, use, hw, layout.use_gpu and hw.has_gpu, threads)
    return with_table_reads(sp, facts, layout, hw)


def plan(
    quants: Sequence[QuantOption],
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    spec: ModelSpec | None = None,
    measured: Sequence[MeasuredPlacement] = (),
) -> Plan:
    """The best plan for this model on this machine (see the module docstring).

    `measured` are placements `qwenrun bench` measured for this very file here: one clearly
    faster than the search's pick replaces it (`measured.prefer_measured`).
    """
    wishes = wishes or Wishes()
    wishes.validate()
    hw = planned_machine(hw, wishes)
    budget = Budget.from_hw(hw)
    name = spec.display if spec is not None else None
    ordered = policy.ordered(quants, wishes)
    named: dict[int, ModelFacts] = {}

    def facts_of(i: int) -> ModelFacts:
        # Only for the quants the search reaches: facts are the costly part of planning.
        if i not in named:
            opt = ordered[i]
            named[i] = replace(opt.facts, name=name or _model_name(opt))
        return named[i]

    threads = planned_threads(wishes, hw)
    # A context of PREFERRED_MIN_CTX or more comes before quality; below it, quality first.
    passes = (PREFERRED_MIN_CTX, MIN_CTX) if wishes.n_ctx is None else (MIN_CTX,)
    smallest = _hopeless(ordered, facts_of, budget, wishes)
    if smallest is not None:
        raise explain.does_not_fit(smallest, hw, budget, wishes, spec, _replan(quants, hw, spec))
    for least in passes:
        rejected: list[tuple[QuantOption, ModelFacts]] = []
        fitting: list[policy.Candidate] = []
        for i, opt in enumerate(ordered):
            if fitting and not policy.worth_trying(opt, fitting, wishes):
                break
            facts = facts_of(i)

            def score(lay: Layout, use: Usage, facts: ModelFacts = facts) -> float:
                return speed_of(facts, lay, use, hw, threads).decode_tok_s

            fit = fit_option(facts, budget, wishes, _repack_flags(hw), least, score)
            if fit is None:
                if not fitting:
                    rejected.append((opt, facts))
                continue
            decode = speed_of(facts, fit.layout, fit.use, hw, threads).decode_tok_s
            fitting.append(policy.Candidate(opt, facts, fit, decode))
        if fitting:
            chosen, why = policy.choose(fitting, wishes)
            mmap = load_config(
                chosen.facts, chosen.fit.layout, wishes, threads=threads, extra_bufts=hw.extra_bufts
            ).mmap_enabled()
            fit, wishes_now, note = prefer_measured(
                chosen.fit,
                chosen.facts,
                measured,
                budget,
                wishes,
                (threads, mmap),
                _repack_flags(hw),
            )
            plan_ = _make_plan(
                chosen.opt, chosen.facts, fit, hw, budget, wishes_now, rejected, least, why
            )
            notes = [note] if note else []
            if spec is not None and spec.unverified and chosen.opt.estimated:
                notes.append(f"not verified: {spec.unverified}")
            return replace(plan_, reasons=(*plan_.reasons, *notes)) if notes else plan_
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
    load = load_config(
        facts, layout, wishes, threads=planned_threads(wishes, hw), extra_bufts=hw.extra_bufts
    )
    gpu_bw = gpu_bandwidth(hw)
    cpu_bw, cpu_bw_note = cpu_bandwidth(hw)
    sp = speed_of(facts, fit.layout, fit.use, hw, load.n_threads)
    devices = _devices(layout, use, budget, hw)
    gpu_expert_layers = use.gpu_expert_layers if layout.use_gpu else 0
    table = explain.table_plan(facts, layout, use, budget, wishes, hw)
    bandwidth = (gpu_bw, cpu_bw, cpu_bw_note)
    reasons = explain.reasons(
        opt, facts, fit, hw, budget, wishes, rejected, load, sp, bandwidth, table
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
        devices=devices,
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
        ngram_table=table,
        weight_classes=facts.weight_classes,
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


def _devices(
    layout: Layout, use: Usage, budget: Budget, hw: HardwareProfile
) -> tuple[DevicePlan, ...]:
    """The plan's devices: each target a spread fills (this machine's RAM always), or this
    machine's GPU (when used) and its RAM."""
    if layout.spread is not None:
        return tuple(
            DevicePlan(
                t.kind,
                hw.cpu_model or "CPU" if t.kind == "cpu" else t.name,
                b,
                t.capacity,
                t.reserved,
                endpoint=t.machine or None,
                buffer=t.buffer,
            )
            for t, b in zip(budget.targets, use.devices, strict=True)
            if b.used or t.kind == "cpu"
        )
    out = []
    if layout.use_gpu and budget.has_gpu:
        out.append(
            DevicePlan(
                "gpu",
                " + ".join(budget.gpu_names),
                use.gpu,
                budget.gpu_capacity,
                budget.gpu_reserved,
                buffer="CUDA0",
            )
        )
    out.append(
        DevicePlan(
            "cpu",
            hw.cpu_model or "CPU",
            use.cpu,
            budget.ram_capacity,
            budget.ram_reserved,
            buffer="CPU",
        )
    )
    return tuple(out)


def planned_threads(wishes: Wishes, hw: HardwareProfile) -> int:
    """`--threads` (at most the machine's logical cores), else the physical cores: decoding
    is bound by memory, and hyper-threads only share a core's path to it."""
    if wishes.threads is not None:
        return min(wishes.threads, hw.logical_cores) if hw.logical_cores else wishes.threads
    return hw.physical_cores or hw.logical_cores or 1


def load_config(
    facts: ModelFacts, layout: Layout, wishes: Wishes, *, threads: int, extra_bufts: bool
) -> LoadConfig:
    """The engine's `LoadConfig` for a searched `layout`, with the user's expert flags."""
    if layout.spread is not None:
        return replace(
            _load_values(facts, layout, threads, extra_bufts),
            placement=spread_placement(facts, layout.spread),
        )
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
    return replace(_load_values(facts, layout, threads, extra_bufts), placement=placement)


def _load_values(facts: ModelFacts, layout: Layout, threads: int, extra_bufts: bool) -> LoadConfig:
    return LoadConfig(
        n_ctx=layout.n_ctx,
        kv_type=layout.kv_type,
        n_ubatch=layout.n_ubatch,
        n_batch=max(layout.n_batch, layout.n_ubatch),
        n_threads=threads,
        extra_bufts=extra_bufts,
        use_mmap=layout.use_mmap,
        # Said either way, never llama.cpp's AUTO (lazy above 4 GiB, whatever the RAM).
        lazy_table=layout.ngram_table == "disk" if facts.has_table else None,
    )


def spread_placement(facts: ModelFacts, spread: Spread) -> Placement:
    """llama.cpp's placement of a spread: one block of layers per stage in order (the MTP
    blocks it skips go with the last), each host's experts on its buffer type, and the
    workers to register."""
    targets = spread.targets
    blocks: list[tuple[str, int]] = [("CPU", spread.cpu_layers)]
    homes: dict[str, tuple[list[int], list[str]]] = {}
    for k, st in enumerate(spread.stages):
        count = st.count + (facts.n_layer_all - facts.n_layer if k == len(spread.stages) - 1 else 0)
        blocks.append((targets[st.target].buffer, count))
        if st.host is None:
            continue
        layers, tensors = homes.setdefault(targets[st.host].buffer, ([], []))
        layers.extend(spread.host_range(k))
        tensors.extend(st.host_tensors)
    workers = tuple(dict.fromkeys(t.machine for t in targets if t.remote))
    return Placement.layer_blocks(
        facts.n_layer_all,
        blocks,
        rpc_workers=workers,
        expert_homes=tuple(
            ExpertHome(buffer, tuple(layers), tuple(tensors))
            for buffer, (layers, tensors) in homes.items()
            if layers or tensors
        ),
    )
