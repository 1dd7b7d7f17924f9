"""`qwenrun plan MODEL` for every kind of reference, and the quant a pull downloads.

Contract: `plan_reference(model, wishes, hw)` plans whatever the other commands take: a local
GGUF (its exact bytes), a catalog name (estimates; `name:QUANT` plans that quant), a hub repo
(its quants' real headers over HTTP ranges), or, offline or with the hub unreachable, a
repo's complete copies in the cache (else an `OfflineError`). `planner_chooser(hw)` is the
chooser `hub.pull` calls to pick the quant to download: the planner's best among what the
repo holds, chosen from tensor sizes before any byte of it comes down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun import catalog, errors
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.measured import MeasuredPlacement
from qwenrun.planner.result import Plan
from qwenrun.planner.sources import plan_cached, plan_for_file, plan_for_spec, plan_listing
from qwenrun.planner.wishes import Wishes

if TYPE_CHECKING:
    from qwenrun.hub.listing import QuantFiles, RepoListing
    from qwenrun.hub.refs import ModelRef


def plan_reference(
    model: str,
    wishes: Wishes,
    hw: HardwareProfile,
    measured: Callable[[Path], Sequence[MeasuredPlacement]] = lambda _path: (),
) -> Plan:
    """`qwenrun plan MODEL`: every model reference the other commands take.

    A local GGUF: its exact bytes, and what `qwenrun bench` measured for it (`measured`). A
    catalog name: estimates from its shapes and quant recipes (`name:QUANT` plans that
    quant, as `--quant` does). A hub repo: its quants' real headers read over HTTP ranges
    (`plan_listing`); offline, or with the hub unreachable, the local headers of its
    complete copies in the cache, else an `OfflineError`.
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
        return plan_for_file(ref.path, hw, wishes, measured=measured(ref.path))
    if ref.quant is not None:
        if wishes.quant and catalog.normalize_quant(wishes.quant) != ref.quant:
            raise errors.UsageError(
                f"{model} names the quant {ref.quant}, and --quant another ({wishes.quant})",
                hint="name the quant once: MODEL:QUANT or --quant QUANT",
            )
        wishes = replace(wishes, quant=ref.quant)
    if ref.kind == "catalog":
        assert ref.spec is not None
        return plan_for_spec(ref.spec, hw, wishes)
    if session.offline():
        return plan_cached(ref, wishes, hw, "offline (HF_HUB_OFFLINE is set)")
    try:
        found = listing.list_repo(ref.repos[0])
    except session.HubUnreachableError:
        return plan_cached(ref, wishes, hw, f"the hub ({session.hub_endpoint()}) is unreachable")
    return plan_listing(found, hw, wishes, ref.spec)


def planner_chooser(hw: HardwareProfile) -> Callable[[ModelRef, RepoListing], QuantFiles]:
    """Pick the quant to download: the planner's best among what the repo holds.

    A catalog model is planned from its shapes and each listed quant's type recipe (an
    estimate, no request); any other repo, or a catalog repo whose quants have no recipe,
    from its files' real headers read over HTTP ranges (`plan_listing`). Either way the
    quant is chosen from tensor sizes before any byte of it is downloaded.
    """

    def choose(ref: ModelRef, listing: RepoListing) -> QuantFiles:
        plan: Plan | None = None
        if ref.spec is not None:
            # No listed quant with a size recipe: read their headers instead.
            with contextlib.suppress(errors.ModelNotFoundError):
                plan = plan_for_spec(ref.spec, hw, quants=listing.quant_names)
        if plan is None:
            plan = plan_listing(listing, hw, Wishes(), ref.spec)
        chosen = listing.find(plan.quant)
        assert chosen is not None
        return chosen

    return choose
