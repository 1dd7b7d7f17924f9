"""Which placements `qwenrun bench` measures: the plan's own and its neighbours.

Contract: pure. From the plan of a model on this machine (its `Layout`, the model's
`ModelFacts`, the `Budget`), `candidates(...)` lists the placements worth measuring, each with a
short label and its `LoadConfig`, the plan's own first: with a GPU and routed experts in RAM,
one CPU-expert layer more and one fewer, the other run of layers (first N ↔ last N), the default
micro-batch of 512 when the plan grew it, and a few thread counts (the physical cores; one
fewer, for the CUDA driver's thread; the logical cores); with every expert on the GPU, or a plan
over several devices, thread counts only; on a CPU-only machine, thread counts and memory-mapped
or loaded weights. Only placements that fit the budget are listed, at most `MAX_CANDIDATES`.
Nothing is loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.offload import Plan, Wishes, load_config
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, usage
from qwenrun.planner.facts import ModelFacts

MAX_CANDIDATES = 8


@dataclass(frozen=True)
class Candidate:
    """One placement to measure: what it is in words, and how to load it."""

    label: str
    load: LoadConfig
    layout: Layout

    @property
    def threads(self) -> int | None:
        return self.load.n_threads

    def describe(self) -> dict[str, object]:
        """The placement in the terms the planner searches (stored with each run)."""
        lay = self.layout
        return {
            "label": self.label,
            "n_gpu_layers": lay.n_gpu_layers,
            "n_cpu_moe": lay.n_cpu_moe,
            "cpu_moe_from": lay.cpu_moe_from,
            "cpu_tensors": list(lay.cpu_tensors),
            "n_ubatch": lay.n_ubatch,
            "n_ctx": lay.n_ctx,
            "kv_type": lay.kv_type,
            "use_gpu": lay.use_gpu,
            "threads": self.load.n_threads,
            "use_mmap": self.load.mmap_enabled(),
            "extra_bufts": self.load.extra_bufts,
            # Runs over several devices are kept and shown, but neither fit the one-GPU speed
            # model nor stand for a one-GPU placement.
            "spread": lay.spread is not None,
        }


def _label(lay: Layout, facts: ModelFacts, threads: int, mmap: bool | None = None) -> str:
    if lay.spread is not None:
        machines = {lay.spread.targets[st.target].machine for st in lay.spread.stages}
        where = f"spread over {len(lay.spread.stages)} devices on {len(machines)} machine(s)"
    elif not lay.use_gpu:
        where = "CPU only"
    elif not facts.is_moe or (lay.n_cpu_moe == 0 and not lay.cpu_tensors):
        where = "all on GPU"
    else:
        part = f" +{len(lay.cpu_tensors)}t" if lay.cpu_tensors else ""
        where = f"{lay.cpu_moe_from} {lay.n_cpu_moe}{part} experts on CPU"
    if lay.spread is None and lay.use_gpu and 0 <= lay.n_gpu_layers <= facts.n_layer:
        where += f", {lay.n_gpu_layers} GPU layers"
    text = f"{where}, {threads} thread{'s' if threads != 1 else ''}"
    if mmap is not None:
        text += ", mmap" if mmap else ", loaded"
    return text


def candidates(
    plan: Plan,
    facts: ModelFacts,
    budget: Budget,
    wishes: Wishes,
    *,
    physical_cores: int,
    logical_cores: int,
    cpu_flags: frozenset[str] = frozenset(),
    extra_bufts: bool = True,
) -> list[Candidate]:
    """The plan's placement first, then its neighbours that fit."""
    base = plan.layout or Layout(n_ctx=plan.n_ctx, use_gpu=plan.gpu is not None)
    planned_threads = plan.load.n_threads or physical_cores
    out: list[Candidate] = []
    seen: set[tuple[object, ...]] = set()

    def add(lay: Layout, threads: int, mmap: bool | None = None) -> None:
        key = (lay, threads, mmap)
        if key in seen or len(out) >= MAX_CANDIDATES or threads < 1:
            return
        if not budget.fits(usage(facts, lay, cpu_flags)):
            return
        seen.add(key)
        if mmap is not None:
            lay = replace(lay, use_mmap=mmap)
        load = load_config(facts, lay, wishes, threads=threads, extra_bufts=extra_bufts)
        out.append(Candidate(_label(lay, facts, threads, mmap), load, lay))

    thread_counts = sorted({planned_threads, physical_cores, physical_cores - 1, logical_cores})
    thread_counts = [t for t in thread_counts if t >= 1]
    if base.spread is not None:
        # Several devices: the plan's own spread, with this machine's thread counts (its
        # neighbours in the one-GPU terms below do not apply).
        add(base, planned_threads)
        for t in thread_counts:
            add(base, t)
        return out
    if not base.use_gpu:
        mmap = plan.load.mmap_enabled()
        add(base, planned_threads, mmap)
        add(base, planned_threads, not mmap)
        for t in thread_counts:
            add(base, t, mmap)
        return out
    add(base, planned_threads)
    experts_on_cpu = facts.is_moe and (base.n_cpu_moe > 0 or base.cpu_tensors)
    if experts_on_cpu:
        other = "first" if base.cpu_moe_from == "last" else "last"
        n = base.n_cpu_moe
        add(replace(base, n_cpu_moe=n + 1, cpu_tensors=()), planned_threads)
        add(replace(base, n_cpu_moe=max(0, n - 1), cpu_tensors=()), planned_threads)
        add(_other_run(base, facts, other), planned_threads)
        if base.n_ubatch > 512:
            add(replace(base, n_ubatch=512, n_batch=2048), planned_threads)
    for t in thread_counts:
        add(base, t)
    return out


def _other_run(lay: Layout, facts: ModelFacts, order: str) -> Layout:
    """The same number of CPU-expert layers at the other end, boundary tensors moved along."""
    moved = replace(lay, cpu_moe_from=order, cpu_tensors=())  # type: ignore[arg-type]
    if not lay.cpu_tensors:
        return moved
    old = lay.boundary_layer(facts.n_layer)
    new = moved.boundary_layer(facts.n_layer)
    renamed = tuple(t.replace(f"blk.{old}.", f"blk.{new}.", 1) for t in lay.cpu_tensors)
    return replace(moved, cpu_tensors=renamed)
