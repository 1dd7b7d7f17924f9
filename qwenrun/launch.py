"""From a model reference and the user's flags to a loaded engine: shared by `run` and `chat`.

Contract: turns the placement/context flags into a `LoadConfig` (the user's flags win;
without placement flags the planner decides from the file's tensor sizes and this
machine), loads the engine, and retries once with more experts on the CPU when a GPU
load runs out of memory. It reads the machine only through `hwprobe` and the model only
through `gguf_info`/`backend`. It prints nothing: what it decided comes back as reasons
for the caller to show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun import config, errors
from qwenrun.placement import KV_TYPES, LoadConfig, Placement

if TYPE_CHECKING:
    from qwenrun.backend import Engine


@dataclass(frozen=True)
class RunOptions:
    """The placement, context and engine flags `run` and `chat` share."""

    ctx: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    kv_type: str | None = None
    verbose: bool = False

    @property
    def placement_given(self) -> bool:
        return self.cpu_moe or self.n_cpu_moe is not None or self.gpu_layers is not None

    def validate(self) -> None:
        if self.ctx is not None and self.ctx < 16:
            raise errors.UsageError(f"--ctx {self.ctx} is too small", hint="use at least 512")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise errors.UsageError("--n-cpu-moe must be 0 or more")
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise errors.UsageError(
                "--cpu-moe and --n-cpu-moe both set",
                hint="--cpu-moe puts every layer's experts on the CPU; pick one",
            )
        if self.threads is not None and self.threads < 1:
            raise errors.UsageError("--threads must be 1 or more")
        if self.kv_type is not None and self.kv_type.lower() not in KV_TYPES:
            raise errors.UsageError(
                f"unknown KV cache type {self.kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}"
            )


@dataclass(frozen=True)
class Decision:
    """The load configuration chosen, and why, in words."""

    load: LoadConfig
    reasons: tuple[str, ...]
    planned: bool


def config_from_flags(opts: RunOptions, n_ctx: int) -> LoadConfig:
    """The user's own placement, as llama.cpp's flags of the same names would give it."""
    gpu_layers = -1 if opts.gpu_layers is None else opts.gpu_layers
    if opts.cpu_moe:
        placement = Placement(n_gpu_layers=gpu_layers, cpu_moe_all=True)
    elif opts.n_cpu_moe:
        placement = Placement.n_cpu_moe(opts.n_cpu_moe, n_gpu_layers=gpu_layers)
    else:
        placement = Placement(n_gpu_layers=gpu_layers)
    return LoadConfig(
        placement=placement,
        n_ctx=n_ctx,
        kv_type=(opts.kv_type or "f16").lower(),
        n_threads=opts.threads,
    )


def decide(path: Path, opts: RunOptions) -> Decision:
    """Flags → LoadConfig, or the planner's choice when no placement flag is given."""
    opts.validate()
    if not opts.placement_given:
        planned = _plan(path, opts)
        if planned is not None:
            return planned
    n_ctx = opts.ctx or config.DEFAULT_CTX
    load = config_from_flags(opts, n_ctx)
    return Decision(load, (f"placement from flags: {load.placement.describe()}",), planned=False)


def _plan(path: Path, opts: RunOptions) -> Decision | None:
    """Ask the planner; None when it cannot say (then flags/defaults apply)."""
    try:
        from qwenrun import hwprobe, offload
    except ImportError:  # the planner is optional at this layer
        return None
    wishes = offload.Wishes(n_ctx=opts.ctx, kv_type=opts.kv_type)
    plan = offload.plan_for_file(path, hwprobe.probe(), wishes)
    load = plan.load
    if opts.threads:
        load = replace(load, n_threads=opts.threads)
    return Decision(load, tuple(plan.reasons), planned=True)


def open_engine(
    path: Path,
    opts: RunOptions,
    *,
    on_progress: Callable[[float], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> tuple[Engine, Decision]:
    """Load the model as decided; on a GPU out-of-memory, retry once with experts on CPU."""
    from qwenrun.backend import Engine

    decision = decide(path, opts)
    try:
        engine = Engine.load(path, decision.load, verbose=opts.verbose, on_progress=on_progress)
    except errors.BackendError as err:
        retry = _more_experts_on_cpu(decision.load)
        if retry is None or "memory" not in err.message:
            raise
        note = f"{err.message}; retrying with {retry.placement.describe()}"
        if on_notice:
            on_notice(note)
        decision = Decision(retry, (*decision.reasons, note), decision.planned)
        engine = Engine.load(path, retry, verbose=opts.verbose, on_progress=on_progress)
    return engine, decision


def _more_experts_on_cpu(load: LoadConfig) -> LoadConfig | None:
    """The same config with every routed expert on the CPU, or None if it already was."""
    if load.placement.cpu_moe_all or load.placement.n_gpu_layers == 0:
        return None
    placement = replace(load.placement, cpu_moe_all=True, expert_cpu_tensors=())
    return replace(load, placement=placement)
