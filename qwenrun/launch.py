"""The one start-up: a model reference and the user's wishes in, a loaded engine out.

Contract: `start(model, wishes, hooks=...)` is what `run`, `chat` and `serve` do before the
first token (`bench` shares its `resolve_model` and loads each placement itself): read the
machine once (`machine.machine`); with no model, take the planner's default for it
(`offload.model_for_this_machine`; when the hub cannot be reached and that one is not
downloaded, the best model the cache holds that fits, said in a notice); resolve the reference
to local GGUF files, pulling a missing model after `hooks.confirm_pull` (the quant chosen by the
planner, `offload.planner_chooser`); plan the load with `offload.plan_for_file` (the wishes are
constraints; what `qwenrun bench` measured for the file is handed over from `bench.store`); load
the engine, retrying once with every routed expert on the CPU when a GPU load runs out of
memory. All planning is the planner's; this module only sequences. It prints nothing: questions,
progress and notices go to the caller's `Hooks`, and what was decided comes back as reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qwenrun import errors, offload
from qwenrun.machine import machine

if TYPE_CHECKING:
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig
    from qwenrun.hub.listing import PullTarget
    from qwenrun.hub.transfer import PullProgress
    from qwenrun.hwprobe import HardwareProfile


class Hooks(Protocol):
    """What start-up shows and asks; `ui.progress.StartupHooks` is the terminal's."""

    def notice(self, text: str) -> None: ...
    def confirm_pull(self, target: PullTarget) -> bool: ...
    def pulling(self) -> AbstractContextManager[Callable[[PullProgress], None]]: ...
    def loading(self) -> AbstractContextManager[Callable[[float], None]]: ...
    # Entered while the once-per-machine CPU kernel check runs (seconds, the first time).
    def checking(self, text: str) -> AbstractContextManager[object]: ...


class QuietHooks:
    """Shows nothing and says yes: for tests, benchmarks and the server's own loads."""

    def notice(self, text: str) -> None:
        pass

    def confirm_pull(self, target: PullTarget) -> bool:
        return True

    def pulling(self) -> AbstractContextManager[Callable[[PullProgress], None]]:
        return _nothing()

    def loading(self) -> AbstractContextManager[Callable[[float], None]]:
        return _nothing()

    def checking(self, text: str) -> AbstractContextManager[object]:
        return _nothing()


@contextmanager
def _nothing() -> Iterator[Callable[[object], None]]:
    yield lambda _p: None


@dataclass(frozen=True)
class Started:
    """A loaded model and everything that was decided to load it, in words."""

    engine: Engine
    plan: offload.Plan
    path: Path
    reasons: tuple[str, ...]  # why this model (when chosen), then the plan's reasons


def start(
    model: str | None,
    wishes: offload.Wishes,
    *,
    hooks: Hooks,
    hw: HardwareProfile | None = None,
    verbose: bool = False,
    prompt_cache: int | None = None,
) -> Started:
    """Model reference (None: the best for this machine) → files → plan → loaded engine.

    `prompt_cache` caps the engine's prompt cache on disk in bytes (0: off; None: the
    environment's or the default, see `engine.promptcache`)."""
    wishes.validate()
    # One reading of the machine serves the default model, the quant to pull and the plan.
    hw = hw or machine(checking=hooks.checking, rpc=wishes.rpc)
    chosen: tuple[str, ...] = ()
    if model is None:
        model, chosen = offload.model_for_this_machine(hw, wishes)
        hooks.notice(chosen[0])
    try:
        path = resolve_model(model, hooks=hooks, hw=hw)
    except errors.DownloadError as err:
        from qwenrun.hub.session import HubUnreachableError, hub_endpoint

        # Only a model we chose may be swapped for a cached one; a named one is the user's.
        if not chosen or not isinstance(err, HubUnreachableError):
            raise
        unreachable = f"the hub ({hub_endpoint()}) cannot be reached"
        model, chosen = offload.cached_instead(hw, wishes, unreachable, model)
        hooks.notice(chosen[0])
        path = resolve_model(model, hooks=hooks, hw=hw)
    engine, plan, notes = open_engine(
        path, wishes, hooks=hooks, hw=hw, verbose=verbose, prompt_cache=prompt_cache
    )
    return Started(engine, plan, path, (*chosen, *plan.reasons, *notes))


def resolve_model(model: str, *, hooks: Hooks, hw: HardwareProfile) -> Path:
    """Any model reference → the local path of its (first) GGUF file, pulling if needed.

    `hw` is the machine the quant to pull is chosen for.
    """
    from qwenrun.hub import pull, refs

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        assert ref.path is not None
        return ref.path
    with hooks.pulling() as on_progress:
        paths = pull.resolve_local(
            ref,
            pull_if_missing=True,
            confirm=hooks.confirm_pull,
            on_progress=on_progress,
            on_notice=hooks.notice,
            choose=offload.planner_chooser(hw),
        )
    return paths[0]


def open_engine(
    path: Path,
    wishes: offload.Wishes,
    *,
    hooks: Hooks,
    hw: HardwareProfile,
    verbose: bool = False,
    prompt_cache: int | None = None,
) -> tuple[Engine, offload.Plan, tuple[str, ...]]:
    """Plan and load the model; on a GPU out-of-memory, retry once with experts on the CPU.

    Returns the engine, the plan and notes on what happened beyond the plan (a retry).
    """
    from qwenrun.engine import doctor
    from qwenrun.engine.llama import Engine

    warning = doctor.cuda_warning(hw, hw.gpu_offload)
    if warning:
        hooks.notice(warning)
    from qwenrun.bench import store

    # What `qwenrun bench` measured for this very file here beats what the model predicts.
    plan = offload.plan_for_file(path, hw, wishes, measured=store.measured(hw, path))
    if prompt_cache is not None:
        plan = replace(plan, load=replace(plan.load, prompt_cache=prompt_cache))
    for warning in plan.warnings:
        hooks.notice(f"note: {warning}")
    try:
        with hooks.loading() as on_progress:
            engine = Engine.load(path, plan.load, verbose=verbose, on_progress=on_progress)
        return engine, plan, ()
    except errors.OutOfMemoryError as err:
        retry = _more_experts_on_cpu(plan.load)
        if retry is None:
            raise
        note = f"{err.message}; retrying with {retry.placement.describe()}"
        hooks.notice(note)
        with hooks.loading() as on_progress:
            engine = Engine.load(path, retry, verbose=verbose, on_progress=on_progress)
        return engine, replace(plan, load=retry), (note,)


def _more_experts_on_cpu(load: LoadConfig) -> LoadConfig | None:
    """The same config with every routed expert on the CPU, or None if it already was."""
    if load.placement.cpu_moe_all or load.placement.n_gpu_layers == 0:
        return None
    placement = replace(load.placement, cpu_moe_all=True, expert_cpu_tensors=())
    return replace(load, placement=placement)
