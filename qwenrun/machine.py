"""This machine as qwenrun plans for it: what `hwprobe` reads, plus what running things taught.

Contract: `machine(backend=..., measure=...)` is how the commands that plan get the machine
(`doctor`, `worker` and `bench --show` call `hwprobe.probe` alone): the `HardwareProfile` of
`hwprobe.probe`, with, when `backend` is asked for, the verdict on llama.cpp's extra CPU kernels
(`engine.crash.cpu_check`, a child process once per machine on CPUs with AMX), and the speed
model `qwenrun bench` fitted here (`bench.store`). The probe stays a reader of the machine; the
verdict and the calibration are handed to it here, by the start-up, so neither the probe nor the
planner reaches into the engine. With `rpc` (the `--rpc` workers), each worker is checked and
registered with llama.cpp (`engine.rpc`), its devices and their free memory are read, and its
round trip is measured: they join the profile as `WorkerInfo`s (a worker serves its GPUs first
and its RAM last).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace

from qwenrun import hwprobe
from qwenrun.hwprobe import HardwareProfile

# Round trips measured per worker: enough for a steady median, a few milliseconds on a LAN.
ROUND_TRIPS = 50


def machine(
    *,
    backend: bool = True,
    measure: bool = False,
    checking: Callable[[str], AbstractContextManager[object]] | None = None,
    rpc: Sequence[str] = (),
) -> HardwareProfile:
    """This machine (see the module docstring). `backend=False` leaves llama.cpp unasked:
    for a question about another machine, or where llama.cpp may be broken. `checking(text)`
    is entered while the CPU kernel check runs its child (the start-up's words for the wait)."""
    from qwenrun.bench import store

    hw = hwprobe.probe(check_backend=backend, measure=measure)
    if backend:
        from qwenrun.engine import crash

        check = crash.cpu_check(hw.cpu_model, hw.cpu_flags, checking=checking)
        hw = replace(hw, extra_bufts=check.extra_bufts, cpu_kernels=check.describe())
    hw = replace(hw, speed_params=store.speed_params(hw))
    return replace(hw, workers=workers(rpc)) if rpc else hw


def workers(endpoints: Sequence[str]) -> tuple[hwprobe.WorkerInfo, ...]:
    """The workers at `endpoints`, registered with llama.cpp, as the planner sees them."""
    from qwenrun.engine import rpc

    out = []
    for w in rpc.connect(endpoints):
        round_trip = statistics.median(rpc.round_trips(w.endpoint, ROUND_TRIPS))
        served = sorted(w.devices, key=lambda d: d.index)
        devices = []
        for i, d in enumerate(served):
            is_cpu = i == len(served) - 1  # `qwenrun worker` serves its RAM last
            if is_cpu:
                gbs, _ = hwprobe.default_cpu_bandwidth(d.description, 16)
            else:
                gbs = hwprobe.gpu_bandwidth_from_name(d.description) or (
                    hwprobe.HYPOTHETICAL_GPU_BANDWIDTH_GBS
                )
            devices.append(
                hwprobe.RemoteDevice(
                    d.buffer_type, d.description, is_cpu, d.total_bytes, d.free_bytes, gbs
                )
            )
        out.append(hwprobe.WorkerInfo(w.endpoint, tuple(devices), round_trip))
    return tuple(out)
