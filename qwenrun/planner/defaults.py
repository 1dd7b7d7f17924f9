"""The model `qwenrun chat` runs when none is named, and a cached one when that cannot come.

Contract: `default_model(hw)` is the catalog model and quant for this machine, and why: among
the hybrid models (they both think and answer directly) whose catalog entry is verified (a
download nobody asked for is never chosen from sizes that are guesses: `ModelSpec.unverified`)
and whose best plan runs at a usable speed with a quant of 3 bits or more, the most parameters,
then the better quant, then the newest. `model_for_this_machine(hw, wishes)` is the reference
the start-up uses: that one, unless offline and not downloaded, then `cached_instead`: the best
complete model in the cache that fits (the start-up also asks it when the hub cannot be reached,
`launch.start`). They plan through `sources` and read the cache through `hub.cache`; nothing
here prints.
"""

from __future__ import annotations

from qwenrun import catalog, errors
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.result import Plan
from qwenrun.planner.sources import plan_for_file, plan_for_spec
from qwenrun.planner.wishes import Wishes

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
    best: tuple[tuple[float, int, int], catalog.ModelSpec, Plan] | None = None
    for order, spec in enumerate(catalog.CATALOG):
        if spec.thinking != "hybrid" or spec.unverified:
            continue  # before planning: only verified hybrids can be the default
        try:
            found = plan_for_spec(spec, hw)
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


def model_for_this_machine(hw: HardwareProfile, wishes: Wishes) -> tuple[str, tuple[str, ...]]:
    """The reference `start` uses when none is given, and why: `default_model`, unless
    offline (HF_HUB_OFFLINE) and it is not downloaded; then the best model in the cache."""
    from qwenrun.hub import cache, refs, session

    offline = "offline (HF_HUB_OFFLINE is set)"
    try:
        name, quant, why = default_model(hw)
    except errors.DoesNotFitError:
        if not session.offline():
            raise
        return cached_instead(hw, wishes, offline, None)  # a small cached model may still do
    reference = f"{name}:{quant}"
    ref = refs.parse_ref(reference)
    if session.offline() and cache.find_cached(ref.repos, ref.quant) is None:
        return cached_instead(hw, wishes, offline, reference)
    return reference, why


def cached_instead(
    hw: HardwareProfile, wishes: Wishes, reason: str, wanted: str | None
) -> tuple[str, tuple[str, ...]]:
    """The best complete model in the cache that the planner fits on `hw` with `wishes`,
    for when `wanted` (the default model) cannot be downloaded; OfflineError when none.

    Best: usable speed first (as for the default model), then the most weights on disk (more
    parameters or more bits: the better answers), then speed.
    """
    from qwenrun.hub import cache, refs, session

    best: tuple[tuple[bool, int, float], cache.CachedQuant, Plan] | None = None
    complete = [c for c in cache.cached_quants() if c.complete and c.first is not None]
    for cached in complete:
        assert cached.first is not None
        try:
            plan = plan_for_file(cached.first, hw, wishes)
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
