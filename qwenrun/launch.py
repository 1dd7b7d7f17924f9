"""The one start-up: a model reference and the user's wishes in, a loaded engine out.

Contract: `start(model, wishes, hooks=...)` is what `run`, `chat` (and later `serve`) do
before the first token: with no model, choose the catalog model and quant for this machine
(`default_model`; offline or with the hub unreachable, when that one is not downloaded, the
best model the cache holds that fits, said in a notice); resolve the reference to local GGUF
files, pulling a missing model after
`hooks.confirm_pull` (the quant chosen by the planner from real tensor sizes,
`planner_chooser`); plan the load with `offload.plan_for_file`, where the wishes are
constraints; load the engine, retrying once with every routed expert on the CPU when a GPU
load runs out of memory. It reads the machine only through `hwprobe`, models only through
the hub and the planner, llama.cpp only through the engine, and prints nothing: questions,
progress and notices go to the caller's `Hooks`, and what it decided comes back as reasons.
`plan_reference` is the same road without loading, for `qwenrun plan`; a hub repo is
planned from its files' real headers read over HTTP ranges (`plan_listing`), which also
chooses the quant to pull for repos outside the catalog.
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
    prompt_cache: int | None = None,
) -> Started:
    """Model reference (None: the best for this machine) → files → plan → loaded engine.

    `prompt_cache` caps the engine's prompt cache on disk in bytes (0: off; None: the
    environment's or the default, see `engine.promptcache`)."""
    wishes.validate()
    # One probe serves the default model, the quant to pull and the load plan.
    hw = hw or hwprobe.probe(check_backend=True)
    chosen: tuple[str, ...] = ()
    if model is None:
        model, chosen = _model_for_this_machine(hw, wishes)
        hooks.notice(chosen[0])
    try:
        path = resolve_model(model, hooks=hooks, hw=hw)
    except errors.DownloadError as err:
        from qwenrun.hub.session import HubUnreachableError, hub_endpoint

        # Only a model we chose may be swapped for a cached one; a named one is the user's.
        if not chosen or not isinstance(err, HubUnreachableError):
            raise
        unreachable = f"the hub ({hub_endpoint()}) cannot be reached"
        model, chosen = _cached_instead(hw, wishes, unreachable, model)
        hooks.notice(chosen[0])
        path = resolve_model(model, hooks=hooks, hw=hw)
    engine, plan, notes = open_engine(
        path, wishes, hooks=hooks, hw=hw, verbose=verbose, prompt_cache=prompt_cache
    )
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
    estimate, no request); any other repo, or a catalog repo whose quants have no recipe,
    from its files' real headers read over HTTP ranges (`plan_listing`). Either way the
    quant is chosen from tensor sizes before any byte of it is downloaded.
    """

    def choose(ref: ModelRef, listing: RepoListing) -> QuantFiles:
        import contextlib

        machine = hw or hwprobe.probe(check_backend=True)
        plan: offload.Plan | None = None
        if ref.spec is not None:
            # No listed quant with a size recipe: read their headers instead.
            with contextlib.suppress(errors.ModelNotFoundError):
                plan = offload.plan_for_spec(ref.spec, machine, quants=listing.quant_names)
        if plan is None:
            plan = plan_listing(listing, machine, offload.Wishes(), ref.spec)
        chosen = listing.find(plan.quant)
        assert chosen is not None
        return chosen

    return choose


# Full precision is never the fast choice and rarely a download anyone wants (as for the
# catalog's offline quants): a repo's F32/BF16/F16 files are candidates only when named or
# when the repo holds nothing else.
_FULL_PRECISION = frozenset({"F32", "BF16", "F16"})


def plan_listing(
    listing: RepoListing,
    hw: HardwareProfile,
    wishes: offload.Wishes,
    spec: catalog.ModelSpec | None = None,
) -> offload.Plan:
    """Plan a hub repo's quants from their files' real headers, read over HTTP ranges.

    Only header bytes come down (1-8 MiB a file, every shard of a split quant). Quants are
    read best first on the quant ladder, and reading stops at the first one that fits with
    the planner's preferred context: `offload.plan` is quality first, so no later (smaller)
    quant can beat it; only a quant that fits with less context leaves the question open.
    A quant whose files exceed RAM and VRAM together (less a header's most) cannot fit and
    is not read at all. The plan is made over every header read, so its reasons can name
    the better quants that did not fit.
    """
    from qwenrun.hub import header
    from qwenrun.hub.listing import no_such_quant
    from qwenrun.planner.search import PREFERRED_MIN_CTX, Budget

    if wishes.quant:
        wanted = listing.find(wishes.quant)
        if wanted is None:
            raise no_such_quant(listing.repo, catalog.normalize_quant(wishes.quant), [listing])
        candidates = [wanted]
    else:
        ladder = sorted(listing.quants, key=lambda q: (catalog.quant_rank(q.quant), -q.total_size))
        quantized = [q for q in ladder if catalog.normalize_quant(q.quant) not in _FULL_PRECISION]
        candidates = quantized or ladder
    if not candidates:
        raise errors.ModelNotFoundError(
            f"{listing.repo} holds no GGUF files", hint="name a repo that has .gguf files"
        )
    budget = Budget.from_hw(
        hwprobe.with_memory(hw, gpu_bytes=wishes.gpu_mem_bytes, ram_bytes=wishes.ram_bytes)
    )
    room = budget.gpu + budget.ram
    read: list[offload.QuantOption] = []
    for q in candidates:
        too_big = q.total_size - len(q.files) * header.MAX_HEADER > room
        if too_big and (read or q is not candidates[-1]):
            continue  # (the last is read when nothing was: the error needs one size)
        info = header.read_hub(listing.repo, listing.revision, q.paths)
        option = offload.QuantOption(q.quant, info, info.files, q.total_size)
        read.append(option)
        try:
            alone = offload.plan([option], hw, wishes, spec)
        except errors.DoesNotFitError:
            continue
        floor = min(PREFERRED_MIN_CTX, alone.native_ctx or PREFERRED_MIN_CTX)
        if wishes.n_ctx is not None or alone.n_ctx >= floor:
            break
    return offload.plan(read, hw, wishes, spec)


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


def plan_reference(model: str, wishes: offload.Wishes, hw: HardwareProfile) -> offload.Plan:
    """`qwenrun plan MODEL`: every model reference the other commands take.

    A local GGUF: its exact bytes. A catalog name: estimates from its shapes and quant
    recipes (`name:QUANT` plans that quant, as `--quant` does). A hub repo: its quants' real
    headers read over HTTP ranges (`plan_listing`); offline, or with the hub unreachable,
    the local headers of its complete copies in the cache, else an `OfflineError`.
    """
    from qwenrun.hub import listing, refs, session

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
        from qwenrun.bench import store

        return offload.plan_for_file(ref.path, hw, wishes, measured=store.measured(hw, ref.path))
    if ref.quant is not None:
        if wishes.quant and catalog.normalize_quant(wishes.quant) != ref.quant:
            raise errors.UsageError(
                f"{model} names the quant {ref.quant}, and --quant another ({wishes.quant})",
                hint="name the quant once: MODEL:QUANT or --quant QUANT",
            )
        wishes = replace(wishes, quant=ref.quant)
    if ref.kind == "catalog":
        assert ref.spec is not None
        return offload.plan_for_spec(ref.spec, hw, wishes)
    if session.offline():
        return _plan_cached(ref, wishes, hw, "offline (HF_HUB_OFFLINE is set)")
    try:
        found = listing.list_repo(ref.repos[0])
    except session.HubUnreachableError:
        return _plan_cached(ref, wishes, hw, f"the hub ({session.hub_endpoint()}) is unreachable")
    return plan_listing(found, hw, wishes, ref.spec)


def _plan_cached(
    ref: ModelRef, wishes: offload.Wishes, hw: HardwareProfile, why: str
) -> offload.Plan:
    """Without the hub: plan a repo's complete copies in the cache from their local headers."""
    from qwenrun.hub import cache, header, session

    repos = {r.lower() for r in ref.repos}
    want = catalog.normalize_quant(wishes.quant) if wishes.quant else None
    options = []
    for c in cache.cached_quants():
        usable = c.repo.lower() in repos and c.complete and c.first is not None
        if usable and (want is None or catalog.normalize_quant(c.quant) == want):
            assert c.first is not None
            info = header.read_local(c.first)
            options.append(offload.QuantOption(c.quant, info, info.files, c.size_on_disk))
    if not options:
        how = "unset HF_HUB_OFFLINE" if session.offline() else "check the network connection"
        raise errors.OfflineError(
            f"{why}, and no copy of {ref} is in the cache to read its headers from",
            hint=f"{how} to read them from the hub, or plan a downloaded model (qwenrun list)",
        )
    return offload.plan(options, hw, wishes, ref.spec)


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
    for order, spec in enumerate(catalog.CATALOG):
        if spec.thinking != "hybrid":
            continue  # before planning: only hybrids can be the default, the rest cost time
        try:
            found = offload.plan_for_spec(spec, hw)
        except errors.DoesNotFitError:
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


def _model_for_this_machine(
    hw: HardwareProfile, wishes: offload.Wishes
) -> tuple[str, tuple[str, ...]]:
    """The reference `start` uses when none is given, and why: `default_model`, unless
    offline (HF_HUB_OFFLINE) and it is not downloaded; then the best model in the cache."""
    from qwenrun.hub import cache, refs, session

    offline = "offline (HF_HUB_OFFLINE is set)"
    try:
        name, quant, why = default_model(hw)
    except errors.DoesNotFitError:
        if not session.offline():
            raise
        return _cached_instead(hw, wishes, offline, None)  # a small cached model may still do
    reference = f"{name}:{quant}"
    ref = refs.parse_ref(reference)
    if session.offline() and cache.find_cached(ref.repos, ref.quant) is None:
        return _cached_instead(hw, wishes, offline, reference)
    return reference, why


def _cached_instead(
    hw: HardwareProfile, wishes: offload.Wishes, reason: str, wanted: str | None
) -> tuple[str, tuple[str, ...]]:
    """The best complete model in the cache that the planner fits on `hw` with `wishes`,
    for when `wanted` (the default model) cannot be downloaded; OfflineError when none.

    Best: usable speed first (as for the default model), then the most weights on disk (more
    parameters or more bits: the better answers), then speed.
    """
    from qwenrun.hub import cache, refs, session

    best: tuple[tuple[bool, int, float], cache.CachedQuant, offload.Plan] | None = None
    complete = [c for c in cache.cached_quants() if c.complete and c.first is not None]
    for cached in complete:
        assert cached.first is not None
        try:
            plan = offload.plan_for_file(cached.first, hw, wishes)
        except (errors.QwenrunError, OSError):
            continue  # does not fit, or not a model this build can plan: not a candidate
        key = (plan.decode_tok_s >= _MIN_DEFAULT_TOK_S, cached.size_on_disk, plan.decode_tok_s)
        if best is None or key > best[0]:
            best = (key, cached, plan)
    instead = f" instead of downloading {wanted}" if wanted else ""
    if best is None:
        n = len(complete)
        have = (
            "no model is downloaded"
            if n == 0
            else "the one downloaded model does not fit this machine"
            if n == 1
            else f"none of the {n} downloaded models fits this machine"
        )
        how = "unset HF_HUB_OFFLINE" if session.offline() else "connect"
        get = f"qwenrun pull {wanted}" if wanted else "qwenrun pull MODEL"
        raise errors.OfflineError(
            f"{reason}, and {have}",
            hint=f"{how} and run: {get}; or name a .gguf file: qwenrun chat ./model.gguf",
        )
    _, cached, plan = best
    reference = refs.reference_for(cached.repo, cached.quant)
    why = (
        f"{reason}: using {reference}, already downloaded,{instead} "
        f"(≈{plan.decode_tok_s:.0f} tok/s on this machine)",
    )
    return reference, why
