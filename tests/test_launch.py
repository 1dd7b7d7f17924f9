"""From flags and a machine (a HardwareProfile value) to what `run`/`chat` load and pull."""

from __future__ import annotations

import pytest

from qwenrun import catalog, errors, offload
from qwenrun.engine import loadconfig
from qwenrun.hub.listing import HubFile, QuantFiles, RepoListing
from qwenrun.hub.refs import parse_ref
from qwenrun.offload import Wishes
from qwenrun.planner import recipes
from qwenrun.testing.hardware import machine

# ---- the plan of a load: the planner fits around the user's wishes


def test_no_flags_lets_the_planner_place_everything(tiny_models):
    path = tiny_models("qwen3moe")
    p = offload.plan_for_file(path, machine(None, 16), Wishes(n_ctx=2048))
    assert p.load.n_ctx == 2048
    assert p.load.placement.n_gpu_layers == 0  # no GPU: all on the CPU, nothing overridden
    assert p.load.placement.override_patterns() == []
    assert any("no GPU" in r for r in p.reasons)


def test_flags_fix_the_placement_and_the_plan_fits_the_context(tiny_models):
    path = tiny_models("qwen3moe")
    p = offload.plan_for_file(path, machine(12, 32), Wishes(n_cpu_moe=2))
    assert p.load.placement.expert_cpu_layers == (0, 1)
    assert p.load.n_ctx >= 4096  # chosen by the planner, not a fixed default
    every = offload.plan_for_file(path, machine(12, 32), Wishes(cpu_moe=True))
    assert every.load.placement.cpu_moe_all
    assert every.load.placement.override_patterns() == [(loadconfig.EXPS_REGEX, "CPU")]


def test_threads_reach_the_load(tiny_models):
    path = tiny_models("qwen3moe")
    p = offload.plan_for_file(path, machine(None, 16), Wishes(threads=3))
    assert p.load.n_threads == 3


def test_a_gpu_the_build_cannot_use_is_planned_as_no_gpu(tiny_models):
    path = tiny_models("qwen3moe")
    usable = offload.plan_for_file(path, machine(24, 32, offload=True), Wishes())
    unusable = offload.plan_for_file(path, machine(24, 32, offload=False), Wishes())
    assert usable.load.placement.n_gpu_layers != 0
    assert unusable.load.placement.n_gpu_layers == 0


@pytest.mark.parametrize(
    ("wishes", "flag"),
    [
        (Wishes(cpu_moe=True, n_cpu_moe=1), "--cpu-moe"),
        (Wishes(n_cpu_moe=-1), "--n-cpu-moe"),
        (Wishes(n_gpu_layers=-2), "--gpu-layers"),
        (Wishes(threads=0), "--threads"),
        (Wishes(kv_type="q3"), "KV cache type"),
        (Wishes(n_ctx=8), "--ctx"),
        (Wishes(n_ctx=255), "--ctx 255 is too small"),
        (Wishes(gpu_mem_bytes=(-1,)), "--gpu-mem"),
    ],
)
def test_bad_wishes_are_usage_errors_naming_the_flag(wishes, flag):
    with pytest.raises(errors.UsageError, match=flag):
        wishes.validate()


def test_one_context_rule_for_every_command(tiny_models):
    # `run`'s check, the planner's and `plan`'s are one: 256 is the floor everywhere.
    assert Wishes(n_ctx=256).validate() is None
    with pytest.raises(errors.UsageError, match="--ctx 100 is too small") as info:
        offload.plan_for_file(tiny_models("qwen3moe"), machine(None, 16), Wishes(n_ctx=100))
    assert info.value.hint == "use at least 256"


# ---- which quant to download: the planner's pick among what the repo holds


def listing(spec: catalog.ModelSpec, quants: list[str]) -> RepoListing:
    files = []
    for q in quants:
        size = recipes.estimate(spec, q).total_bytes
        files.append(QuantFiles(q, (HubFile(f"{spec.display}-{q}.gguf", size, "0" * 64, None),)))
    return RepoListing(spec.repos[0], "main", tuple(files), ())


def test_planner_chooses_what_fits_the_machine():
    spec = catalog.lookup("qwen3-30b-a3b")
    ref = parse_ref(spec.name)
    offer = listing(spec, ["Q8_0", "Q4_K_M", "Q2_K"])
    small = offload.planner_chooser(machine(8, 24))(ref, offer)
    big = offload.planner_chooser(machine(80, 128))(ref, offer)
    assert small.quant == "Q4_K_M"
    assert big.quant == "Q8_0"


def test_nothing_fits_is_said_before_any_download():
    spec = catalog.lookup("qwen3-235b-a22b")
    with pytest.raises(errors.DoesNotFitError):
        offload.planner_chooser(machine(None, 16))(parse_ref(spec.name), listing(spec, ["Q4_K_M"]))


# ---- the model `qwenrun chat` picks when none is named


def test_default_model_grows_with_the_machine():
    laptop, _, why = offload.default_model(machine(8, 32))
    workstation, _, _ = offload.default_model(machine(80, 256))
    size = {s.name: s.params_total for s in catalog.CATALOG}
    assert size[workstation] > size[laptop]
    assert catalog.lookup(laptop).thinking == "hybrid"
    assert why and "fits this machine" in why[0]


def test_default_model_refuses_a_machine_too_small():
    with pytest.raises(errors.DoesNotFitError, match="no Qwen MoE model"):
        offload.default_model(machine(None, 4))
