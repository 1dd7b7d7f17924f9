"""Which quant `--prefer` takes among those that fit: the quant-choice policy.

Contract: pure. `ordered(quants, wishes)` lists a model's quants best first on
`catalog.QUANT_LADDER` (only the one asked for with `--quant`); `worth_trying` says whether
the search should go on to a worse quant once a better one fits; `choose(fitting, wishes)`
takes the quant the preference asks for and says why in words when it is not simply the
best that fits:

- quality: the best quant that fits.
- balanced (the default): the best quant that decodes at `BALANCED_SHARE` of the fastest
  4-bit-class quant's speed, or at `BALANCED_ENOUGH_TOK_S` (past that, answers come faster
  than anyone reads, and quality is worth more than speed).
- speed: the fastest quant of the 4-bit class or better; below that class quality drops
  faster than speed grows, so no preference goes there on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwenrun import catalog, errors
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.options import QuantOption
from qwenrun.planner.search import Fit
from qwenrun.planner.wishes import Wishes

# How `--prefer balanced` (the default) trades quality for speed: the best quant that decodes
# at BALANCED_SHARE of the fastest 4-bit-class quant's speed or more, or at BALANCED_ENOUGH_TOK_S
# (past that, answers come faster than anyone reads, and quality is worth more than speed).
BALANCED_SHARE = 0.8
BALANCED_ENOUGH_TOK_S = 40.0
# The 4-bit class: the smallest quants whose answers stay close to the full model's; below it
# quality drops faster than speed grows, so `speed` never goes there on its own.
FOUR_BIT = (
    "UD-Q4_K_XL",
    "Q4_K_L",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "IQ4_NL",
    "UD-IQ4_XS",
    "IQ4_XS",
    "Q4_0",
    "MXFP4_MOE",
)
_FOUR_BIT_FLOOR = max(catalog.quant_rank(q) for q in FOUR_BIT)


@dataclass(frozen=True)
class Candidate:
    opt: QuantOption
    facts: ModelFacts
    fit: Fit
    decode_tok_s: float


def ordered(quants: Sequence[QuantOption], wishes: Wishes) -> list[QuantOption]:
    if not quants:
        raise errors.ModelNotFoundError("no quant to plan for", hint="check the model name")
    # Best first; the bigger file first within a rank (size as listed: no header is read).
    options = sorted(quants, key=lambda q: (catalog.quant_rank(q.name), -q.size_bytes))
    if wishes.quant:
        want = catalog.normalize_quant(wishes.quant)
        options = [q for q in options if catalog.normalize_quant(q.name) == want]
        if not options:
            have = ", ".join(
                q.name for q in sorted(quants, key=lambda q: catalog.quant_rank(q.name))
            )
            raise errors.UsageError(
                f"quant {wishes.quant} is not available for this model", hint=f"choose from {have}"
            )
    return options


def worth_trying(opt: QuantOption, fitting: list[Candidate], wishes: Wishes) -> bool:
    """Whether a worse quant can still be chosen, once a better one fits: only down to the
    end of the 4-bit class, and only when the preference weighs speed at all."""
    if wishes.prefer == "quality" or wishes.quant:
        return False
    return catalog.quant_rank(opt.name) <= _FOUR_BIT_FLOOR


def choose(fitting: list[Candidate], wishes: Wishes) -> tuple[Candidate, str | None]:
    """The quant `--prefer` asks for among those that fit (best quality first), and why, in
    words, when it is not simply the best that fits."""
    best = fitting[0]
    four_bit = [c for c in fitting if catalog.quant_rank(c.opt.name) <= _FOUR_BIT_FLOOR]
    if wishes.prefer == "quality" or len(fitting) == 1 or not four_bit:
        return best, None
    fastest = max(four_bit, key=lambda c: c.decode_tok_s)
    if wishes.prefer == "speed":
        chosen = fastest
        why = "the fastest quant of 4-bit class or better (--prefer speed)"
    else:
        floor = min(BALANCED_SHARE * fastest.decode_tok_s, BALANCED_ENOUGH_TOK_S)
        chosen = next(c for c in fitting if c.decode_tok_s >= floor or c is fastest)
        why = (
            f"the best quant that decodes at {BALANCED_SHARE:.0%} of the fastest 4-bit "
            f"quant's speed ({fastest.opt.name}, ≈ {fastest.decode_tok_s:.0f} tok/s) or at "
            f"{BALANCED_ENOUGH_TOK_S:.0f} tok/s"
        )
    if chosen is best:
        return best, None
    why = (
        f"{chosen.opt.name} (≈ {chosen.decode_tok_s:.0f} tok/s) is {why}; the best quant that "
        f"fits, {best.opt.name}, would decode at ≈ {best.decode_tok_s:.0f} tok/s "
        "(--prefer quality takes it)"
    )
    return chosen, why
