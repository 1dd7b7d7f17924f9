"""The one bisection the planner's searches share.

Contract: pure. `smallest(lo, hi, ok)` is the smallest x in [lo, hi] with `ok(x)`, for a
predicate that is false and then true along the range (more experts on the CPU, fewer GPU
layers: what fits only gets easier); None when even `ok(hi)` is false.
"""

from __future__ import annotations

from collections.abc import Callable


def smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """See the module docstring."""
    if lo > hi or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
