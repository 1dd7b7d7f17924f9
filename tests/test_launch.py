"""From flags and a machine (a HardwareProfile value) to what `run`/`chat` load and pull."""

from __future__ import annotations

import pytest

from qwenrun import catalog, errors, gguf_info, launch
from qwenrun.download import HubFile, QuantFiles, RepoListing
from qwenrun.refs import parse_ref
from qwenrun.testing.hardware import machine

# ---- decide: the planner fits around the user's flags


def test_no_flags_lets_the_planner_place_everything(tiny_models):
    path = tiny_models("qwen3moe")
    d = launch.decide(path, launch.RunOptions(ctx=2048), machine(None, 16))
    assert d.load.n_ctx == 2048
    assert d.load.placement.n_gpu_layers == 0  # no GPU: all on the CPU, nothing overridden
    assert d.load.placement.override_patterns() == []
    assert any("no GPU" in r for r in d.reasons)


def test_flags_fix_the_placement_and_the_plan_fits_the_context(tiny_models):
    path = tiny_models("qwen3moe")
    d = launch.decide(path, launch.RunOptions(n_cpu_moe=2), machine(12, 32))
    assert d.load.placement.expert_cpu_layers == (0, 1)
    assert d.load.n_ctx >= 4096  # chosen by the planner, not a fixed default
    assert any("your flags" in r for r in d.reasons)
    every = launch.decide(path, launch.RunOptions(cpu_moe=True), machine(12, 32))
    assert every.load.placement.cpu_moe_all


def test_a_gpu_the_build_cannot_use_is_planned_as_no_gpu(tiny_models):
    path = tiny_models("qwen3moe")
    usable = launch.decide(path, launch.RunOptions(), machine(24, 32, offload=True))
    unusable = launch.decide(path, launch.RunOptions(), machine(24, 32, offload=False))
    assert usable.load.placement.n_gpu_layers != 0
    assert unusable.load.placement.n_gpu_layers == 0


@pytest.mark.parametrize(
    ("opts", "flag"),
    [
        (launch.RunOptions(cpu_moe=True, n_cpu_moe=1), "--cpu-moe"),
        (launch.RunOptions(n_cpu_moe=-1), "--n-cpu-moe"),
        (launch.RunOptions(gpu_layers=-2), "--gpu-layers"),
        (launch.RunOptions(threads=0), "--threads"),
        (launch.RunOptions(kv_type="q3"), "KV cache type"),
        (launch.RunOptions(ctx=8), "--ctx"),
    ],
)
def test_bad_flags_are_usage_errors(opts, flag):
    with pytest.raises(errors.UsageError, match=flag):
        opts.validate()


# ---- which quant to download: the planner's pick among what the repo holds


def listing(spec: catalog.ModelSpec, quants: list[str]) -> RepoListing:
    files = []
    for q in quants:
        size = gguf_info.estimate(spec, q).total_bytes
        files.append(QuantFiles(q, (HubFile(f"{spec.display}-{q}.gguf", size, "0" * 64, None),)))
    return RepoListing(spec.repos[0], "main", tuple(files), ())


def test_planner_chooses_what_fits_the_machine():
    spec = catalog.lookup("qwen3-30b-a3b")
    ref = parse_ref(spec.name)
    offer = listing(spec, ["Q8_0", "Q4_K_M", "Q2_K"])
    small = launch.planner_chooser(machine(8, 24))(ref, offer)
    big = launch.planner_chooser(machine(80, 128))(ref, offer)
    assert small.quant == "Q4_K_M"
    assert big.quant == "Q8_0"


def test_nothing_fits_is_said_before_any_download():
    spec = catalog.lookup("qwen3-235b-a22b")
    with pytest.raises(errors.DoesNotFitError):
        launch.planner_chooser(machine(None, 16))(parse_ref(spec.name), listing(spec, ["Q4_K_M"]))


# ---- the model `qwenrun chat` picks when none is named


def test_default_model_grows_with_the_machine():
    laptop, _, why = launch.default_model(machine(8, 32))
    workstation, _, _ = launch.default_model(machine(80, 256))
    size = {s.name: s.params_total for s in catalog.CATALOG}
    assert size[workstation] > size[laptop]
    assert catalog.lookup(laptop).thinking == "hybrid"
    assert why and "fits this machine" in why[0]


def test_default_model_refuses_a_machine_too_small():
    with pytest.raises(errors.DoesNotFitError, match="no Qwen MoE model"):
        launch.default_model(machine(None, 4))
