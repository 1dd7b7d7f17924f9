"""Where a model's candidate quants come from, and the plans of each kind of source.

Contract: the planner's reading doors, each ending in `decide.plan`:

- `plan_for_file(path, hw, wishes, measured)`: a local GGUF (every shard's header): exact
  bytes; the file is the quant.
- `plan_for_spec(spec, hw, wishes, quants)`: a catalog model before anything is downloaded,
  estimated from its shapes and each quant's type recipe (`recipes`), with the facts kept on
  disk between runs (`factcache`); `plan_catalog(hw)` does every catalog model.
- `plan_listing(listing, hw, wishes, spec)`: a hub repo's quants from their files' real
  headers, read over HTTP ranges (only header bytes come down).
- `plan_cached(ref, wishes, hw, why)`: a repo's complete copies in the Hugging Face cache,
  from their local headers (for when the hub cannot be asked).

It reads files and the hub through `hub.header`, the cache through `hub.cache`; the
deciding is `decide.py`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun import catalog, errors
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.budget import Budget
from qwenrun.planner.decide import plan
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.measured import MeasuredPlacement
from qwenrun.planner.options import QuantOption, quant_name_for
from qwenrun.planner.result import Plan
from qwenrun.planner.search import PREFERRED_MIN_CTX
from qwenrun.planner.wishes import Wishes, planned_machine

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.hub.listing import RepoListing
    from qwenrun.hub.refs import ModelRef


def plan_for_file(
    path: str | Path,
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    measured: Sequence[MeasuredPlacement] = (),
) -> Plan:
    """Read a local GGUF (all shards) and plan it: exact bytes from its header."""
    from qwenrun.hub import header

    info = header.read_local(path)
    if info.arch not in catalog.QWEN_ARCHES:
        raise errors.UnsupportedModelError(
            f"{Path(path).name}: architecture {info.arch!r} is not one qwenrun plans for",
            hint=f"qwenrun runs Qwen GGUFs: {', '.join(catalog.QWEN_ARCHES)}",
        )
    files = tuple(info.files) or (str(path),)
    size = sum(Path(f).stat().st_size for f in files if Path(f).exists())
    option = QuantOption(quant_name_for(info, path), info, files, size, local=True)
    # The file is the quant: a --quant wish cannot choose another one here.
    return plan([option], hw, replace(wishes or Wishes(), quant=None), measured=measured)


# --------------------------------------------------------------------------------------
# A catalog model (offline: estimated sizes)


# The quants planned offline: unsloth's set, because every catalog model has an unsloth repo
# and these are what it publishes (catalog.md §2.1). Full precision is left out: it is never
# the fast choice and rarely a download anyone wants.
OFFLINE_QUANTS: tuple[str, ...] = (
    "UD-Q8_K_XL",
    "Q8_0",
    "UD-Q6_K_XL",
    "Q6_K",
    "UD-Q5_K_XL",
    "Q5_K_M",
    "UD-Q4_K_XL",
    "Q4_K_M",
    "UD-IQ4_XS",
    "UD-Q3_K_XL",
    "Q3_K_M",
    "UD-IQ3_XXS",
    "UD-Q2_K_XL",
    "UD-IQ2_M",
    "UD-IQ2_XXS",
    "UD-IQ1_M",
    "UD-IQ1_S",
)


def options_for_spec(spec: ModelSpec, quants: Sequence[str] = OFFLINE_QUANTS) -> list[QuantOption]:
    """Quants of `spec` with estimated tensor lists (no network); quants without a size
    recipe are left out (they cannot be planned before download)."""
    out = []
    for q in quants:
        option = _catalog_option(spec, q)
        if option is not None:
            out.append(option)
    return out


@functools.lru_cache(maxsize=512)
def _catalog_option(spec: ModelSpec, quant: str) -> QuantOption | None:
    """One estimated quant, kept for the process: probe, the default model and the
    does-not-fit alternatives plan the same catalog quants again and again."""
    from qwenrun.planner import factcache, recipes

    if not recipes.has_recipe(quant, spec.shape.arch):
        return None
    make = functools.partial(recipes.estimate, spec, quant)
    return QuantOption(
        quant,
        make,
        estimate=True,
        facts_source=functools.partial(
            factcache.cached_facts, spec, quant, lambda: ModelFacts.from_info(make())
        ),
    )


def plan_for_spec(
    spec: ModelSpec,
    hw: HardwareProfile,
    wishes: Wishes | None = None,
    quants: Sequence[str] = OFFLINE_QUANTS,
) -> Plan:
    """Plan a catalog model before anything is downloaded, from its shapes and the recipes
    of `quants` (by default unsloth's set; a repo listing's quants when choosing a pull)."""
    wanted = list(quants)
    if wishes is not None and wishes.quant:
        want = catalog.normalize_quant(wishes.quant)
        if want not in wanted:
            wanted.append(want)  # any quant with a size recipe can be asked for
    return plan(options_for_spec(spec, wanted), hw, wishes, spec)


def plan_catalog(hw: HardwareProfile) -> list[tuple[ModelSpec, Plan | errors.DoesNotFitError]]:
    """The best plan of every catalog model on `hw`, or why it does not fit."""
    out: list[tuple[ModelSpec, Plan | errors.DoesNotFitError]] = []
    for spec in catalog.CATALOG:
        try:
            out.append((spec, plan_for_spec(spec, hw)))
        except errors.DoesNotFitError as err:
            out.append((spec, err))
    return out


# Full precision is never the fast choice and rarely a download anyone wants (as for the
# catalog's offline quants): a repo's F32/BF16/F16 files are candidates only when named or
# when the repo holds nothing else.
_FULL_PRECISION = frozenset({"F32", "BF16", "F16"})


def plan_listing(
    listing: RepoListing,
    hw: HardwareProfile,
    wishes: Wishes,
    spec: catalog.ModelSpec | None = None,
) -> Plan:
    """Plan a hub repo's quants from their files' real headers, read over HTTP ranges.

    Only header bytes come down (1-8 MiB a file, every shard of a split quant). Quants are
    read best first on the quant ladder, and reading stops at the first one that fits with
    the planner's preferred context: `decide.plan` is quality first, so no later (smaller)
    quant can beat it; only a quant that fits with less context leaves the question open.
    A quant whose files exceed RAM and VRAM together (less a header's most) cannot fit and
    is not read at all. The plan is made over every header read, so its reasons can name
    the better quants that did not fit.
    """
    from qwenrun.hub import header
    from qwenrun.hub.listing import no_such_quant

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
    budget = Budget.from_hw(planned_machine(hw, wishes))
    room = budget.gpu + budget.ram
    read: list[QuantOption] = []
    for q in candidates:
        too_big = q.total_size - len(q.files) * header.MAX_HEADER > room
        if too_big and (read or q is not candidates[-1]):
            continue  # (the last is read when nothing was: the error needs one size)
        info = header.read_hub(listing.repo, listing.revision, q.paths)
        option = QuantOption(q.quant, info, info.files, q.total_size)
        read.append(option)
        try:
            alone = plan([option], hw, wishes, spec)
        except errors.DoesNotFitError:
            continue
        floor = min(PREFERRED_MIN_CTX, alone.native_ctx or PREFERRED_MIN_CTX)
        if wishes.n_ctx is not None or alone.n_ctx >= floor:
            break
    return plan(read, hw, wishes, spec)


def plan_cached(ref: ModelRef, wishes: Wishes, hw: HardwareProfile, why: str) -> Plan:
    """Without the hub: plan a repo's complete copies in the cache from their local headers."""
    from qwenrun.hub import cache, header, session

    options = []
    for c in cache.matching(ref.repos, wishes.quant, complete=True):
        assert c.first is not None  # complete: every file is there
        info = header.read_local(c.first)
        options.append(QuantOption(c.quant, info, info.files, c.size_on_disk))
    if not options:
        how = "unset HF_HUB_OFFLINE" if session.offline() else "check the network connection"
        raise errors.OfflineError(
            f"{why}, and no copy of {ref} is in the cache to read its headers from",
            hint=f"{how} to read them from the hub, or plan a downloaded model (qwenrun list)",
        )
    return plan(options, hw, wishes, ref.spec)
