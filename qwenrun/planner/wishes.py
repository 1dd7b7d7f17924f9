"""What the user fixed for a plan (`Wishes`), and the one check of those settings.

Contract: pure values. A `Wishes` holds every setting a command can hand the planner (quant,
context, KV type, where the experts go, GPU layers, where an n-gram table lives, threads, the
quant preference, the `--rpc` workers, and a hypothetical machine's memory and workers); None or
False means "choose for me". `validate()` is the only check of them, one rule per setting, each
message naming the flag; every command (run, chat, serve, bench, plan) goes through it before
anything is probed, pulled or loaded. `fixed_cpu_moe` and `cpu_moe_order` read the expert
settings the way the search needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwenrun import errors, hwprobe
from qwenrun.engine.loadconfig import KV_TYPES
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.costs import CpuMoeFrom, NgramPlace
from qwenrun.planner.facts import ModelFacts

Prefer = Literal["quality", "balanced", "speed"]

# The smallest context anyone may ask for: llama.cpp pads contexts to 256 cells, and a
# chat template alone takes dozens of tokens.
MIN_USER_CTX = 256


@dataclass(frozen=True)
class Wishes:
    """What the user fixed. None (or False) means "choose for me"."""

    quant: str | None = None
    n_ctx: int | None = None
    kv_type: str | None = None
    cpu_moe: bool = False  # every layer's routed experts on the CPU
    n_cpu_moe: int | None = None  # N layers' routed experts on the CPU (the first N alone)
    cpu_moe_from: CpuMoeFrom | None = None  # which layers' experts: "first" or "last" N
    n_gpu_layers: int | None = None
    threads: int | None = None
    prefer: Prefer = "balanced"  # how to weigh quality against speed when choosing the quant
    # Plan for GPUs of these sizes, one each (`(0,)`: no GPU); None: this machine's.
    gpu_mem_bytes: tuple[int, ...] | None = None
    ram_bytes: int | None = None  # plan for this much RAM
    # `qwenrun worker`s ("host:port") whose devices this machine uses (`--rpc`).
    rpc: tuple[str, ...] = ()
    # Hypothetical workers for `qwenrun plan --worker`: (their GPUs' sizes, their RAM).
    workers: tuple[tuple[tuple[int, ...], int], ...] = ()
    # Qwen3.8-Flash-Next's n-gram table: read into RAM, or read from the file as needed.
    ngram_table: NgramPlace | None = None

    def validate(self) -> None:
        """The one check of the user's settings; each message names the flag."""
        if self.n_ctx is not None and self.n_ctx < MIN_USER_CTX:
            raise errors.UsageError(
                f"--ctx {self.n_ctx} is too small", hint=f"use at least {MIN_USER_CTX}"
            )
        if self.kv_type is not None and self.kv_type.lower() not in KV_TYPES:
            raise errors.UsageError(
                f"unknown KV cache type {self.kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}"
            )
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise errors.UsageError(
                "--cpu-moe and --n-cpu-moe both set",
                hint="--cpu-moe puts every layer's experts on the CPU; pick one",
            )
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise errors.UsageError("--n-cpu-moe must be 0 or more")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise errors.UsageError("--gpu-layers must be -1 (all) or more")
        if self.cpu_moe_from is not None and self.cpu_moe_from not in ("first", "last"):
            raise errors.UsageError(
                f"--cpu-moe-from {self.cpu_moe_from!r} is not a choice",
                hint="first (llama.cpp's --n-cpu-moe) or last (llama.cpp's --fit)",
            )
        if self.threads is not None and self.threads < 1:
            raise errors.UsageError("--threads must be 1 or more")
        if self.ngram_table is not None and self.ngram_table not in ("ram", "disk"):
            raise errors.UsageError(
                f"--ngram-table {self.ngram_table!r} is not a choice",
                hint="ram (read whole into memory) or disk (rows read from the file as needed)",
            )
        if self.prefer not in ("quality", "balanced", "speed"):
            raise errors.UsageError(
                f"--prefer {self.prefer!r} is not a choice", hint="quality, balanced or speed"
            )
        sizes = [("--gpu-mem", v) for v in self.gpu_mem_bytes or ()]
        sizes += [("--ram", self.ram_bytes)] if self.ram_bytes is not None else []
        for gpus, ram in self.workers:
            sizes += [("--worker", v) for v in (*gpus, ram)]
        for flag, value in sizes:
            if value < 0:
                raise errors.UsageError(f"{flag} cannot be negative")
        if len(set(self.rpc)) != len(self.rpc):
            raise errors.UsageError("--rpc names a worker twice", hint="list each host:port once")

    @property
    def placed_by_user(self) -> bool:
        """Whether the user fixed where the experts or layers go."""
        return (
            self.cpu_moe
            or self.n_cpu_moe is not None
            or self.n_gpu_layers is not None
            or self.cpu_moe_from is not None
        )

    def constraints(self) -> list[str]:
        """The fixed settings, as the flags that set them."""
        out = []
        if self.quant:
            out.append(f"--quant {self.quant}")
        if self.n_ctx is not None:
            out.append(f"--ctx {self.n_ctx}")
        if self.cpu_moe:
            out.append("--cpu-moe")
        if self.n_cpu_moe is not None:
            out.append(f"--n-cpu-moe {self.n_cpu_moe}")
        if self.cpu_moe_from is not None:
            out.append(f"--cpu-moe-from {self.cpu_moe_from}")
        if self.n_gpu_layers is not None:
            out.append(f"--gpu-layers {self.n_gpu_layers}")
        if self.kv_type:
            out.append(f"--kv-type {self.kv_type}")
        if self.ngram_table is not None:
            out.append(f"--ngram-table {self.ngram_table}")
        return out


def planned_machine(hw: HardwareProfile, wishes: Wishes) -> HardwareProfile:
    """The machine a plan is for: `hw`, with the memory and workers the wishes describe
    (`--gpu-mem`, `--ram`, `--worker`) in place of its own."""
    return hwprobe.with_memory(
        hw, gpu_bytes=wishes.gpu_mem_bytes, ram_bytes=wishes.ram_bytes, workers=wishes.workers
    )


def fixed_cpu_moe(facts: ModelFacts, wishes: Wishes) -> int | None:
    """The layers whose experts the user put on the CPU (`--cpu-moe`: all); None if free."""
    return facts.n_layer if wishes.cpu_moe else wishes.n_cpu_moe


def cpu_moe_order(wishes: Wishes) -> CpuMoeFrom:
    """Which layers' experts go to the CPU: the user's choice; `--n-cpu-moe N` alone means the
    first N, as in llama.cpp; otherwise the last ones, as llama.cpp's `--fit` chooses."""
    if wishes.cpu_moe_from is not None:
        return wishes.cpu_moe_from
    return "first" if wishes.n_cpu_moe is not None else "last"
