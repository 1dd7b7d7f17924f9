"""This machine as qwenrun plans for it: what `hwprobe` reads, plus what running things taught.

Contract: `machine(backend=..., measure=...)` is the one way commands get the machine: the
`HardwareProfile` of `hwprobe.probe`, with, when `backend` is asked for, the verdict on
llama.cpp's extra CPU kernels (`engine.crash.cpu_check`, a child process once per machine on
CPUs with AMX), and the speed model `qwenrun bench` fitted here (`bench.store`). The probe
stays a reader of the machine; the verdict and the calibration are handed to it here, by the
start-up, so neither the probe nor the planner reaches into the engine.
"""

from __future__ import annotations

from dataclasses import replace

from qwenrun import hwprobe
from qwenrun.hwprobe import HardwareProfile


def machine(*, backend: bool = True, measure: bool = False) -> HardwareProfile:
    """This machine (see the module docstring). `backend=False` leaves llama.cpp unasked:
    for a question about another machine, or where llama.cpp may be broken."""
    from qwenrun.bench import store

    hw = hwprobe.probe(check_backend=backend, measure=measure)
    if backend:
        from qwenrun.engine import crash

        check = crash.cpu_check(hw.cpu_model, hw.cpu_flags)
        hw = replace(hw, extra_bufts=check.extra_bufts, cpu_kernels=check.describe())
    return replace(hw, speed_params=store.speed_params(hw))
