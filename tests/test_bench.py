"""`qwenrun bench`: the placements it tries, how it runs them, what it keeps, what plans learn.

The candidates of a GPU machine are planned on hypothetical machines (`HardwareProfile`
values); the runs are real llama.cpp on generated models, on this machine's CPU.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qwenrun import catalog, hwprobe, offload
from qwenrun.bench import candidates, runner, store
from qwenrun.engine.loadconfig import LoadConfig, Placement
from qwenrun.offload import Wishes
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.recipes import estimate
from qwenrun.testing.hardware import machine
from qwenrun.testing.proc import run_qwenrun
from qwenrun.ui import tables

SPEC = catalog.lookup("qwen3-30b-a3b")


def _gpu_candidates(gpu_gib: float) -> tuple[list[candidates.Candidate], offload.Plan]:
    hw = machine(gpu_gib, 64)
    plan = offload.plan_for_spec(SPEC, hw, Wishes(quant="Q4_K_M"))
    facts = ModelFacts.from_info(estimate(SPEC, "Q4_K_M"))
    cands = candidates.candidates(
        plan, facts, Budget.from_hw(hw), Wishes(), physical_cores=16, logical_cores=32
    )
    return cands, plan


def test_a_gpu_machine_measures_the_plan_and_its_neighbours():
    cands, plan = _gpu_candidates(16)
    planned = cands[0].layout
    assert planned == plan.layout and planned.cpu_moe_from == "last"
    layouts = [c.layout for c in cands]
    n = planned.n_cpu_moe
    assert any(lay.n_cpu_moe == n + 1 and lay.cpu_moe_from == "last" for lay in layouts)
    # One layer fewer is tried only if it fits: the plan already filled the VRAM left over.
    facts = ModelFacts.from_info(estimate(SPEC, "Q4_K_M"))
    budget = Budget.from_hw(machine(16, 64))
    fewer = replace(planned, n_cpu_moe=n - 1, cpu_tensors=())
    assert (fewer in layouts) == budget.fits(usage(facts, fewer))
    assert any(lay.n_cpu_moe == n and lay.cpu_moe_from == "first" for lay in layouts)
    assert {c.threads for c in cands} >= {15, 16, 32}  # one fewer for the CUDA driver thread
    # Each one fits the machine, and each one loads what its label says.
    for c in cands:
        assert budget.fits(usage(facts, c.layout))
        assert len(c.load.placement.expert_cpu_layers) == c.layout.n_cpu_moe
    assert len({c.label for c in cands}) == len(cands)


def test_the_other_run_of_layers_moves_its_boundary_tensors_along():
    cands, _plan = _gpu_candidates(12)
    flipped = next(c for c in cands if c.layout.cpu_moe_from == "first")
    boundary = flipped.layout.boundary_layer(48)
    assert all(t.startswith(f"blk.{boundary}.") for t in flipped.layout.cpu_tensors)


def test_a_cpu_only_machine_measures_threads_and_mmap(tiny_models):
    path = tiny_models("qwen3moe", steer=2)
    hw = machine(None, 16)
    plan = offload.plan_for_file(path, hw)
    facts = ModelFacts.from_info(_header(path))
    cands = candidates.candidates(
        plan, facts, Budget.from_hw(hw), Wishes(), physical_cores=4, logical_cores=8
    )
    assert {c.load.mmap_enabled() for c in cands} == {True, False}
    assert {c.threads for c in cands} >= {3, 4, 8}


def _header(path: Path):  # type: ignore[no-untyped-def]
    from qwenrun.hub.header import read_local

    return read_local(path)


def test_runs_alternate_so_drift_falls_on_every_candidate():
    assert runner.schedule(3, 3) == [
        (0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0), (2, 0), (2, 1), (2, 2)
    ]  # fmt: skip


@pytest.mark.slow
def test_every_run_decodes_exactly_the_tokens_asked_even_from_a_model_that_stops(tiny_models):
    path = tiny_models("qwen3moe", steer=1, eos_bias=10.0)  # ends every answer at once
    cand = candidates.Candidate(
        "cpu", LoadConfig(n_ctx=512, n_threads=2), Layout(n_ctx=512, use_gpu=False)
    )
    settings = runner.BenchSettings(prompt_tokens=40, gen_tokens=12, rounds=2)
    runs = runner.run_bench(path, [cand, cand], settings)
    assert len(runs) == 4 and all(r.ok for r in runs)
    assert all(r.generated_tokens == 12 and r.prompt_tokens == 40 for r in runs)
    assert all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 for r in runs)
    (s0, s1) = runner.summarize(runs, 2)
    assert s0.runs == s1.runs == 2 and s0.decode_min <= s0.decode_median <= s0.decode_max


def test_a_candidate_that_cannot_load_is_recorded_and_the_bench_goes_on(tiny_models):
    path = tiny_models("qwen3moe", steer=2)
    bad = LoadConfig(
        n_ctx=512, placement=Placement(n_gpu_layers=0, extra_overrides=(("blk", "NOPE"),))
    )
    cands = [
        candidates.Candidate("broken", bad, Layout(n_ctx=512, use_gpu=False)),
        candidates.Candidate("fine", LoadConfig(n_ctx=512), Layout(n_ctx=512, use_gpu=False)),
    ]
    runs = runner.run_bench(path, cands, runner.BenchSettings(32, 4, 1))
    assert [r.ok for r in runs] == [False, True]
    assert "NOPE" in (runs[0].error or "")
    summary = runner.summarize(runs, 2)
    assert summary[0].failed == 1 and summary[1].runs == 1


@pytest.mark.slow
def test_bench_shows_its_runs_when_the_home_cannot_keep_them(tiny_models, tmp_path):
    # QWENRUN_HOME is a regular file: the runs cannot be stored, the table is still shown,
    # and one line says why they were not kept (issue 19: a traceback lost them).
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    model = str(tiny_models("qwen3moe", steer=2))
    args = ("bench", model, "--rounds", "1", "--prompt", "16", "--gen", "4", "--ctx", "512")
    proc = run_qwenrun(*args, env={"QWENRUN_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "decode tok/s" in proc.stdout and "(planned)" in proc.stdout
    why = [ln for ln in proc.stderr.splitlines() if "not kept" in ln]
    assert len(why) == 1 and "cannot be written" in why[0]
    assert home.read_text() == ""  # nothing was written anywhere near it
    # --json: the runs on stdout, the reason in the document.
    report = json.loads(run_qwenrun(*args, "--json", env={"QWENRUN_HOME": str(home)}).stdout)
    assert report["runs"] and all(r["error"] is None for r in report["runs"])
    assert "cannot be written" in report["not_kept"]


@pytest.mark.slow
def test_bench_keeps_its_runs_and_plans_learn_from_them(tiny_models):
    model = str(tiny_models("qwen3moe", steer=2))
    proc = run_qwenrun(
        "bench", model, "--rounds", "2", "--prompt", "32", "--gen", "8", "--ctx", "512", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    n_cands = len(report["candidates"])
    assert n_cands >= 2 and len(report["runs"]) == 2 * n_cands
    assert report["calibrated_on_runs"] == 2 * n_cands
    assert all(r["error"] is None for r in report["runs"])

    # Kept for this machine, listed by --show, and fitted into the speed model.
    shown = json.loads(run_qwenrun("bench", "--show", "--json").stdout)
    assert sum(len(g["decode"]) for g in shown) == 2 * n_cands
    assert store.speed_params(hwprobe.probe())  # the start-up hands it to every plan
    plan = json.loads(run_qwenrun("plan", model, "--ctx", "512", "--json").stdout)
    fitted = [r for r in plan["reasons"] if "predicted decode" in r]
    assert fitted and "fitted to this machine's" in fitted[0]
    # The plan takes a measured placement exactly when the runs say it is faster beyond
    # their spread (the rule bench's own verdict shows), and keeps its own otherwise.
    runs = [
        tuple(r["decode_tok_s"] for r in report["runs"] if r["candidate"] == i)
        for i in range(n_cands)
    ]
    clear = [i for i in range(1, n_cands) if offload.clearly_faster(runs[i], runs[0])]
    took = [r for r in plan["reasons"] if "measured faster by `qwenrun bench`" in r]
    assert bool(took) == bool(clear)
    if clear:
        best = max(clear, key=lambda i: sorted(runs[i])[len(runs[i]) // 2])
        assert plan["n_threads"] == report["candidates"][best]["threads"]
    else:
        assert plan["n_threads"] == report["candidates"][0]["threads"]


def _store_runs(hw, model, cands, decode_runs):  # type: ignore[no-untyped-def]
    """Keep runs of each candidate with the given decode speeds, as bench would."""
    runs = [
        runner.Run(c, k, prefill_tok_s=100.0, decode_tok_s=v, generated_tokens=8)
        for c, values in enumerate(decode_runs)
        for k, v in enumerate(values)
    ]
    settings = runner.BenchSettings(rounds=len(decode_runs[0]))
    store.save(hw, store.model_identity(model, "F32"), cands, runs, settings)


@pytest.mark.parametrize(
    ("planned", "other", "taken"),
    [
        # The spreads of the busy 2-core machine: noise, not a faster placement.
        ((20.7, 5.5, 36.7), (37.3, 6.2, 38.9), False),
        ((10.0, 11.0, 12.0), (30.0, 31.0, 32.0), True),  # apart beyond any run's spread
        ((10.0, 11.0, 12.0), (11.5, 31.0, 32.0), False),  # one slow run overlaps
        ((10.0,), (30.0,), False),  # one run each cannot show a spread
    ],
)
def test_a_measured_placement_wins_only_beyond_the_spread(tiny_models, planned, other, taken):
    model = tiny_models("qwen3moe", steer=2)
    hw = hwprobe.probe()
    wishes = Wishes(n_ctx=512)
    plan = offload.plan_for_file(model, hw, wishes)
    facts = ModelFacts.from_info(_header(model))
    cands = candidates.candidates(
        plan,
        facts,
        Budget.from_hw(hw),
        wishes,
        physical_cores=hw.physical_cores,
        logical_cores=hw.logical_cores,
    )
    assert cands[0].load.n_threads == plan.load.n_threads  # the plan's own comes first
    _store_runs(hw, model, cands[:2], [planned, other])
    again = offload.plan_for_file(model, hw, wishes, measured=store.measured(hw, model))
    took = any("measured faster by `qwenrun bench`" in r for r in again.reasons)
    assert took == taken
    want = cands[1] if taken else cands[0]
    assert (again.load.n_threads, again.load.mmap_enabled()) == (
        want.load.n_threads,
        want.load.mmap_enabled(),
    )


def test_bench_says_no_measurable_difference_when_spreads_overlap():
    noisy = [
        tables.BenchRow("planned", (20.7, 5.5, 36.7), (1.0, 1.0, 1.0), planned=True),
        tables.BenchRow("other", (37.3, 6.2, 38.9), (1.0, 1.0, 1.0)),
    ]
    assert tables.bench_winner(noisy) is None
    assert "no measurable difference" in tables.bench_verdict(noisy)
    clear = [noisy[0], tables.BenchRow("other", (40.0, 41.0, 39.0), (1.0, 1.0, 1.0))]
    assert tables.bench_winner(clear) == 1
    assert tables.bench_verdict(clear).startswith("★ other is faster")


def test_measured_placements_only_apply_to_the_same_file(tiny_models, tmp_path):
    model = tiny_models("qwen3moe", steer=2)
    other = tiny_models("qwen3moe", steer=2, n_layer=2)
    hw = hwprobe.probe()
    cand = candidates.Candidate(
        "cpu, 1 thread", LoadConfig(n_ctx=512, n_threads=1), Layout(n_ctx=512, use_gpu=False)
    )
    run = runner.Run(0, 0, prefill_tok_s=100.0, decode_tok_s=50.0, generated_tokens=8)
    store.save(hw, store.model_identity(model, "F32"), [cand], [run], runner.BenchSettings())
    assert [m.threads for m in store.measured(hw, model)] == [1]
    assert store.measured(hw, other) == []
    # A placement the user fixed is kept, measured or not.
    fixed = offload.plan_for_file(
        model, hw, Wishes(n_ctx=512, n_gpu_layers=0), measured=store.measured(hw, model)
    )
    assert not any("measured faster" in r for r in fixed.reasons)


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"gen_tokens": 1}])
def test_bad_bench_settings_are_usage_errors(bad):
    from qwenrun import errors

    with pytest.raises(errors.UsageError):
        replace(runner.BenchSettings(), **bad).validate()
