"""The one start-up: a model reference and the user's wishes in, a loaded engine out.

Contract: `start(model, wishes, hooks=...)` is what `run`, `chat` (and later `serve`) do
before the first token: with no model, choose the catalog model and quant for this machine
(`default_model`); resolve the reference to local GGUF files, pulling a missing model after
`hooks.confirm_pull` (the quant chosen by the planner from real tensor sizes,
`planner_chooser`); plan the load with `offload.plan_for_file`, where the wishes are
constraints; load the engine, retrying once with every routed expert on the CPU when a GPU
load runs out of memory. It reads the machine only through `hwprobe`, models only through
the hub and the planner, llama.cpp only through the engine, and prints nothing: questions,
progress and notices go to the caller's `Hooks`, and what it decided comes back as reasons.
`plan_reference` is the same road without loading, for `qwenrun plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qwenrun import catalog, errors, hwprobe, offload

if TYPE_CHECKING:
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import LoadConfig
    from qwenrun.hub.listing import PullTarget, QuantFiles, RepoListing
    from qwenrun.hub.refs import ModelRef
    from qwenrun.hub.transfer import PullProgress
    from qwenrun.hwprobe import HardwareProfile


class Hooks(Protocol):
    """What start-up shows and asks; `ui.progress.StartupHooks` is the terminal's."""

    def notice(self, text: str) -> None: ...
    def confirm_pull(self, target: PullTarget) -> bool: ...
    def pulling(self) -> AbstractContextManager[Callable[[PullProgress], None]]: ...
    def loading(self) -> AbstractContextManager[Callable[[float], None]]: ...


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
) -> Started:
    """Model reference (None: the best for this machine) → files → plan → loaded engine."""
    wishes.validate()
    # One probe serves the default model, the quant to pull and the load plan.
    hw = hw or hwprobe.probe(check_backend=True)
    chosen: tuple[str, ...] = ()
    if model is None:
        name, quant, chosen = default_model(hw)
        model = f"{name}:{quant}"
        hooks.notice(chosen[0])
    path = resolve_model(model, hooks=hooks, hw=hw)
    engine, plan, notes = open_engine(path, wishes, hooks=hooks, hw=hw, verbose=verbose)
    return Started(engine, plan, path, (*chosen, *plan.reasons, *notes))


def resolve_model(model: str, *, hooks: Hooks, hw: HardwareProfile | None = None) -> Path:
    """Any model reference → the local path of its (first) GGUF file, pulling if needed.

    `hw` is the machine the quant to pull is chosen for (probed when needed if None).
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
            choose=planner_chooser(hw),
        )
    return paths[0]


def planner_chooser(
    hw: HardwareProfile | None = None,
) -> Callable[[ModelRef, RepoListing], QuantFiles]:
    """Pick the quant to download: the planner's best among what the repo holds.

    A catalog model is planned from its shapes and each listed quant's type recipe (an
    estimate, before any byte is downloaded); a repo outside the catalog falls back to
    `listing.choose_quant`'s 4-bit default.
    """

    def choose(ref: ModelRef, listing: RepoListing) -> QuantFiles:
        from qwenrun.hub.listing import choose_quant

        if ref.spec is None:
            return choose_quant(ref, listing)
        machine = hw or hwprobe.probe(check_backend=True)
        try:
            plan = offload.plan_for_spec(ref.spec, machine, quants=listing.quant_names)
        except errors.ModelNotFoundError:
            return choose_quant(ref, listing)  # no listed quant has a size recipe
        chosen = listing.find(plan.quant)
        assert chosen is not None
        return chosen

    return choose


def open_engine(
    path: Path,
    wishes: offload.Wishes,
    *,
    hooks: Hooks,
    hw: HardwareProfile,
    verbose: bool = False,
) -> tuple[Engine, offload.Plan, tuple[str, ...]]:
    """Plan and load the model; on a GPU out-of-memory, retry once with experts on the CPU.

    Returns the engine, the plan and notes on what happened beyond the plan (a retry).
    """
    from qwenrun import doctor
    from qwenrun.engine.llama import Engine

    warning = doctor.cuda_warning(hw, hw.gpu_offload)
    if warning:
        hooks.notice(warning)
    plan = offload.plan_for_file(path, hw, wishes)
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


def plan_reference(model: str, wishes: offload.Wishes, hw: HardwareProfile) -> offload.Plan:
    """`qwenrun plan MODEL`: a local GGUF (exact bytes) or a catalog name (estimates)."""
    from qwenrun.hub import refs

    wishes.validate()
    ref = refs.parse_ref(model)
    if ref.kind == "file":
        assert ref.path is not None
        if wishes.quant:
            q = wishes.quant
            raise errors.UsageError(
                "--quant chooses among a catalog model's quants; a file is one quant already",
                hint=f"drop --quant, or plan a catalog model: qwenrun plan NAME --quant {q}",
            )
        return offload.plan_for_file(ref.path, hw, wishes)
    spec = catalog.lookup(model)
    return offload.plan_for_spec(spec, hw, wishes)


# A default model must be pleasant to chat with: this fast at least, and no lower than a
# 3-bit quant (below that, answers degrade faster than a smaller model's would).
_MIN_DEFAULT_TOK_S = 5.0
_MIN_DEFAULT_QUANT = "Q3_K_M"


def default_model(hw: HardwareProfile) -> tuple[str, str, tuple[str, ...]]:
    """The catalog model and quant `qwenrun chat` uses when none is named, and why.

    Among hybrid models (they both think and answer directly) whose best plan runs at a
    usable speed with a quant of 3 bits or more: the most parameters, then the better quant,
    then the newest. Returns (reference, quant, reasons).
    """
    floor = catalog.quant_rank(_MIN_DEFAULT_QUANT)
    best: tuple[tuple[float, int, int], catalog.ModelSpec, offload.Plan] | None = None
    for order, (spec, found) in enumerate(offload.plan_catalog(hw)):
        if spec.thinking != "hybrid" or isinstance(found, errors.DoesNotFitError):
            continue
        rank = catalog.quant_rank(found.quant)
        if found.decode_tok_s < _MIN_DEFAULT_TOK_S or rank > floor:
            continue
        key = (spec.params_total, -rank, order)
        if best is None or key > best[0]:
            best = (key, spec, found)
    if best is None:
        raise errors.DoesNotFitError(
            "no Qwen MoE model runs usably on this machine "
            f"(at least {_MIN_DEFAULT_TOK_S:g} tok/s with a 3-bit or better quant)",
            hint="`qwenrun probe` lists each model with what it would need",
        )
    _, spec, plan = best
    why = (
        f"{spec.display} at {plan.quant}: the largest hybrid (thinking and direct) Qwen MoE "
        f"that fits this machine at ≈{plan.decode_tok_s:.0f} tok/s",
    )
    return spec.name, plan.quant, why
