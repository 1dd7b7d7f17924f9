"""One plan over several devices: GPUs of one machine, and workers' machines (issue 18).

Machines are `HardwareProfile` values (`hwprobe.with_memory` adds GPUs and hypothetical
workers); bytes come from the catalog's estimates and from real generated GGUF headers.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qwenrun import catalog, errors, hwprobe, offload
from qwenrun.offload import Wishes
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, Spread, Stage, spread_usage, usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.testing.hardware import machine
from qwenrun.testing.proc import error_line, run_qwenrun
from qwenrun.units import GIB

Q397 = catalog.lookup("qwen3.5-397b")
Q30 = catalog.lookup("qwen3-30b-a3b")


def _facts(spec: catalog.ModelSpec, quant: str) -> ModelFacts:
    opt = next(o for o in offload.options_for_spec(spec) if o.name == quant)
    return opt.facts


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(24, 24), (24, 12), (16, 8, 8)])
def test_each_gpu_stays_within_its_own_budget(sizes):
    hw = machine(None, 128)
    wishes = Wishes(gpu_mem_bytes=tuple(s * GIB for s in sizes), ram_bytes=128 * GIB)
    p = offload.plan_for_spec(Q397, hw, wishes)
    gpus = [d for d in p.devices if d.kind == "gpu"]
    assert len(gpus) == len(sizes)
    for d, size in zip(gpus, sizes, strict=True):
        assert d.capacity == size * GIB
        assert 0 < d.bytes.used <= d.budget
    # Not one pool: each GPU takes its own contiguous run, the bigger the card the more.
    assert p.layout is not None and p.layout.spread is not None
    runs = [st.count for st in p.layout.spread.stages]
    assert sum(runs) + p.layout.spread.cpu_layers == p.n_layer
    assert runs == sorted(runs, reverse=True) or len(set(sizes)) == 1
    assert any("not one pool" in r for r in p.reasons)


def test_llama_cpp_gets_the_blocks_the_plan_made():
    wishes = Wishes(gpu_mem_bytes=(24 * GIB, 12 * GIB), ram_bytes=128 * GIB)
    p = offload.plan_for_spec(Q397, machine(None, 128), wishes)
    assert p.layout is not None and p.layout.spread is not None
    placement = p.load.placement
    where = placement.layer_devices(p.n_layer)
    assert where is not None
    expected = []
    for st, r in zip(p.layout.spread.stages, p.layout.spread.ranges(), strict=True):
        expected += [p.layout.spread.targets[st.target].buffer] * len(r)
    assert list(where[: p.n_layer]) == expected
    assert where[-1] == expected[-1]  # the output layer with the last run
    hosted = {i for k in range(len(p.layout.spread.stages)) for i in p.layout.spread.host_range(k)}
    homes = {i for h in placement.expert_homes for i in h.layers}
    assert homes == hosted and all(h.buffer == "CPU" for h in placement.expert_homes)


def test_one_stage_costs_what_the_one_gpu_model_says():
    """The spread's bytes agree with the one-GPU model they generalize."""
    facts = _facts(Q30, "Q4_K_M")
    hw = machine(24, 64)
    budget = Budget.from_hw(hw)
    n = facts.n_layer
    for k in (0, 5, n):
        one = Layout(n_ctx=8192, n_cpu_moe=k, cpu_moe_from="last")
        spread = Spread(budget.targets, 0, (Stage(0, n, host=1, host_layers=k),))
        many = replace(one, spread=spread)
        a, b = usage(facts, one), spread_usage(facts, many)
        assert b.devices[0].weights == a.gpu.weights
        assert b.devices[0].kv == a.gpu.kv and b.devices[0].rs == a.gpu.rs
        assert b.devices[1].weights == a.cpu.weights
        assert b.devices[0].compute == a.gpu.compute


def test_two_machines_hold_what_one_cannot_and_say_how_fast():
    hw = machine(None, 128)
    alone = Wishes(quant="UD-Q4_K_XL", gpu_mem_bytes=(24 * GIB,), ram_bytes=128 * GIB)
    with pytest.raises(errors.DoesNotFitError) as err:
        offload.plan_for_spec(Q397, hw, alone)
    assert "more machine" in (err.value.hint or "") and "qwenrun worker" in (err.value.hint or "")
    two = replace(alone, workers=(((24 * GIB,), 128 * GIB),))
    p = offload.plan_for_spec(Q397, hw, two)
    kinds = [d.kind for d in p.devices]
    assert kinds.count("remote") == 2  # the worker's GPU and its RAM
    for d in p.devices:
        assert d.bytes.used <= d.budget
    assert p.layout is not None and p.layout.spread is not None
    spread = p.layout.spread
    # Each machine one contiguous run, its experts in its own RAM.
    machines = [spread.targets[st.target].machine for st in spread.stages]
    assert machines == sorted(set(machines), key=machines.index)
    for st in spread.stages:
        if st.host is not None:
            assert spread.targets[st.host].machine == spread.targets[st.target].machine
    assert 0.5 < p.decode_tok_s < 50
    assert any("hand-off" in r for r in p.reasons)
    assert any("contiguous block" in r for r in p.reasons)


def test_a_gpu_s_placement_flags_are_refused_over_several_devices():
    wishes = Wishes(gpu_mem_bytes=(24 * GIB, 24 * GIB), ram_bytes=128 * GIB, n_cpu_moe=4)
    with pytest.raises(errors.UsageError, match="--n-cpu-moe"):
        offload.plan_for_spec(Q30, machine(None, 128), wishes)


def test_cpu_moe_keeps_every_expert_in_ram_over_several_gpus():
    wishes = Wishes(gpu_mem_bytes=(24 * GIB, 24 * GIB), ram_bytes=128 * GIB, cpu_moe=True)
    p = offload.plan_for_spec(Q30, machine(None, 128), wishes, quants=("Q4_K_M",))
    assert p.layout is not None and p.layout.spread is not None
    assert all(st.host_layers == st.count for st in p.layout.spread.stages)
    assert all(d.bytes.weights_experts == 0 for d in p.devices if d.kind == "gpu")


def test_hypothetical_workers_are_values():
    hw = hwprobe.with_memory(machine(None, 64), workers=[((24 * GIB, 12 * GIB), 64 * GIB)])
    (w,) = hw.workers
    assert w.hypothetical and [d.is_cpu for d in w.devices] == [False, False, True]
    assert [d.total_bytes // GIB for d in w.devices] == [24, 12, 64]


@pytest.mark.slow
def test_plan_cli_takes_several_gpus_and_workers():
    proc = run_qwenrun(
        "plan", "qwen3.5-397b", "--gpu-mem", "24GiB,24GiB", "--ram", "128GiB", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    gpus = [d for d in p["devices"] if d["kind"] == "gpu"]
    assert len(gpus) == 2
    for d in p["devices"]:
        assert {"name", "kind", "endpoint", "capacity_bytes", "planned_bytes"} <= set(d)
        assert d["planned_bytes"] <= d["capacity_bytes"]
    proc = run_qwenrun(
        "plan",
        "qwen3.5-397b:UD-Q4_K_XL",
        "--gpu-mem",
        "24GiB",
        "--ram",
        "128GiB",
        "--worker",
        "24GiB/128GiB",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    remote = [d for d in p["devices"] if d["kind"] == "remote"]
    assert len(remote) == 2 and all(d["endpoint"] == "worker 1" for d in remote)
    assert p["predicted"]["decode_tok_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["24GiB", "lots/64G", "24G/"])
def test_a_worker_that_cannot_be_read_is_one_line(bad):
    line = error_line(run_qwenrun("plan", "qwen3-30b-a3b", "--worker", bad), 2)
    assert "--worker" in line
