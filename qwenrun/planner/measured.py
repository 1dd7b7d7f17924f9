"""What `qwenrun bench` measured, as the planner uses it: the rule for trusting a measurement.

Contract: pure. `MeasuredPlacement` is one placement of one model file measured on this
machine, with the decode speed of each of its runs (bench hands these over as plain values;
it owns their storage). `clearly_faster(a, b)` is the one rule that says whether one set of
runs beats another beyond their spread: at least `MIN_RUNS` runs each, and the slowest run
of `a` faster than the fastest run of `b` (their ranges do not overlap). Short of that the
difference is noise on the machine as far as anyone can tell. `prefer_measured(...)` applies
the rule for the planner: a measured placement replaces the search's pick only when the
search's own placement was measured too and the other is clearly faster than it, fits the
budget now, and the user did not fix the placement. `bench`'s table reads the same rule.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import CpuMoeFrom, Layout, usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.search import Fit
from qwenrun.planner.wishes import Wishes

# One run of each cannot tell a difference from noise: the spread of a single run is unknown.
MIN_RUNS = 2


def clearly_faster(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether runs `a` are faster than runs `b` beyond what their spread allows."""
    return len(a) >= MIN_RUNS and len(b) >= MIN_RUNS and min(a) > max(b)


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
    decode_runs: tuple[float, ...]  # tok/s of each run

    @property
    def decode_tok_s(self) -> float:
        """The median of its runs."""
        return statistics.median(self.decode_runs) if self.decode_runs else 0.0

    @property
    def runs(self) -> int:
        return len(self.decode_runs)

    def applied_to(self, layout: Layout) -> Layout:
        """`layout` (its context and KV type) with this placement."""
        return replace(
            layout,
            n_gpu_layers=self.n_gpu_layers,
            n_cpu_moe=self.n_cpu_moe,
            cpu_moe_from=self.cpu_moe_from,
            cpu_tensors=self.cpu_tensors,
            n_ubatch=self.n_ubatch,
            n_batch=max(layout.n_batch, self.n_ubatch),
            use_mmap=self.use_mmap,
        )

    def is_placement(self, layout: Layout, threads: int | None, use_mmap: bool) -> bool:
        """Whether this is the placement `layout` (with these threads and mmap) describes."""
        mine = (self.n_gpu_layers, self.n_cpu_moe, self.cpu_moe_from, self.cpu_tensors)
        theirs = (layout.n_gpu_layers, layout.n_cpu_moe, layout.cpu_moe_from, layout.cpu_tensors)
        return (
            mine == theirs
            and (self.n_ubatch, self.use_gpu, self.threads)
            == (layout.n_ubatch, layout.use_gpu, threads)
            and self.use_mmap in (None, use_mmap)
        )


def prefer_measured(
    fit: Fit,
    facts: ModelFacts,
    measured: Sequence[MeasuredPlacement],
    budget: Budget,
    wishes: Wishes,
    planned: tuple[int | None, bool],
    flags: frozenset[str],
) -> tuple[Fit, Wishes, str | None]:
    """The measured placement clearly faster than the search's pick, if one fits now.

    `planned` is the search's pick's thread count and memory-mapping, which with its layout
    identify its own measurement. Returns the fit and wishes to use, and the reason in words
    when a measurement changed them.
    """
    if not measured or wishes.placed_by_user:
        return fit, wishes, None
    threads, mmap = planned
    own = [m for m in measured if m.is_placement(fit.layout, threads, mmap)]
    if not own:
        return fit, wishes, None  # the pick was never measured: nothing to compare against
    baseline = own[0].decode_runs
    for m in sorted(measured, key=lambda m: -m.decode_tok_s):
        if m.use_gpu != fit.layout.use_gpu or not clearly_faster(m.decode_runs, baseline):
            continue
        layout = m.applied_to(fit.layout)
        use = usage(facts, layout, flags)
        if not budget.fits(use):
            continue
        chosen_threads = wishes.threads if wishes.threads is not None else m.threads
        note = (
            f"placement measured faster by `qwenrun bench` on this machine: {m.label} "
            f"({min(m.decode_runs):.1f}-{max(m.decode_runs):.1f} tok/s over {m.runs} runs, "
            f"against {min(baseline):.1f}-{max(baseline):.1f} for the planned one)"
        )
        return Fit(layout, use, fit.ctx_reason), replace(wishes, threads=chosen_threads), note
    return fit, wishes, None
