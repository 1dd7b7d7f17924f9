"""`Wishes` (planner/wishes.py): the user's settings, their one check, and how the planner fits
a load around them on a machine given as a `HardwareProfile` value."""

from __future__ import annotations

import pytest

from qwenrun import errors, offload
from qwenrun.engine import loadconfig
from qwenrun.offload import Wishes
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


@pytest.mark.slow
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
