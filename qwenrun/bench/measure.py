"""One `qwenrun bench`: from a model reference to measured, stored, learned-from results.

Contract: `measure(model, wishes, settings, hooks, on_progress)` resolves the model as `run`
does (none named: the planner's default; pulling after the hooks' confirmation), plans it, lists
the candidates around the plan (`candidates`), runs them (`runner`), stores every run and refits
this machine's speed model (`store`), and returns a `Report`; a store that cannot be written
leaves the runs in the report and says why (`Report.not_kept`). `stored(hw)` gives the results
kept for this machine (`bench --show`). It prints nothing; the CLI renders the report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from qwenrun import launch, offload
from qwenrun.bench import candidates, runner, store
from qwenrun.hwprobe import HardwareProfile
from qwenrun.machine import machine


@dataclass(frozen=True)
class Report:
    machine: str
    model: dict[str, Any]
    settings: runner.BenchSettings
    candidates: list[candidates.Candidate]
    runs: list[runner.Run]
    summary: list[runner.Summary]
    calibrated_on: int  # runs the speed model was refitted from
    not_kept: str | None = None  # why the runs could not be stored, when they could not

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "model": self.model,
            "settings": asdict(self.settings),
            "candidates": [c.describe() for c in self.candidates],
            "runs": [asdict(r) for r in self.runs],
            "summary": [asdict(s) for s in self.summary],
            "calibrated_on_runs": self.calibrated_on,
            "not_kept": self.not_kept,
        }


def measure(
    model: str | None,
    wishes: offload.Wishes,
    settings: runner.BenchSettings,
    *,
    hooks: launch.Hooks,
    on_progress: runner.Progress | None = None,
) -> Report:
    from qwenrun.hub import header
    from qwenrun.planner.budget import Budget
    from qwenrun.planner.facts import ModelFacts
    from qwenrun.planner.wishes import planned_machine

    wishes.validate()
    settings.validate()
    hw = machine(rpc=wishes.rpc, checking=hooks.checking)
    if model is None:
        name, quant, _why = offload.default_model(hw)
        model = f"{name}:{quant}"
    path = launch.resolve_model(model, hooks=hooks, hw=hw)
    plan = offload.plan_for_file(path, hw, wishes)
    facts = ModelFacts.from_info(header.read_local(path))
    cands = candidates.candidates(
        plan,
        facts,
        Budget.from_hw(planned_machine(hw, wishes)),
        wishes,
        physical_cores=hw.physical_cores,
        logical_cores=hw.logical_cores,
        cpu_flags=hw.cpu_flags if hw.extra_bufts else frozenset(),
        extra_bufts=hw.extra_bufts,
    )
    runs = runner.run_bench(path, cands, settings, on_progress)
    ident = store.model_identity(path, plan.quant)
    not_kept = None
    try:
        store.save(hw, ident, cands, runs, settings)
        fitted = store.refit(hw)
    except OSError as exc:
        # The runs are still shown; they only cannot teach later plans.
        fitted = 0
        not_kept = f"{store.runs_file()} cannot be written ({exc.strerror or exc})"
    return Report(
        machine=store.machine_key(hw),
        model=ident,
        settings=settings,
        candidates=cands,
        runs=runs,
        summary=runner.summarize(runs, len(cands)),
        calibrated_on=fitted,
        not_kept=not_kept,
    )


@dataclass(frozen=True)
class StoredGroup:
    """The runs of one placement of one model file kept for this machine."""

    model: str
    label: str
    decode: list[float]
    prefill: list[float]
    failed: int
    last_at: float


def stored(hw: HardwareProfile) -> list[StoredGroup]:
    """`qwenrun bench --show`: what was measured on this machine, grouped by model and
    placement, in the order it was first measured."""
    groups: dict[tuple[str, str], StoredGroup] = {}
    dec: dict[tuple[str, str], list[float]] = defaultdict(list)
    pre: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    last: dict[tuple[str, str], float] = {}
    order: list[tuple[str, str]] = []
    for rec in store.records(store.machine_key(hw)):
        model = rec.get("model") or {}
        key = (str(model.get("file", "?")), str((rec.get("placement") or {}).get("label", "?")))
        if key not in last:
            order.append(key)
        last[key] = float(rec.get("at") or 0.0)
        if rec.get("error"):
            failed[key] += 1
        else:
            dec[key].append(float(rec.get("decode_tok_s") or 0.0))
            pre[key].append(float(rec.get("prefill_tok_s") or 0.0))
    for key in order:
        groups[key] = StoredGroup(key[0], key[1], dec[key], pre[key], failed[key], last[key])
    return list(groups.values())
