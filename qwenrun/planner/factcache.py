"""The catalog's planner facts, kept on disk between runs, so `qwenrun probe` stays quick.

Contract: `cached_facts(spec, quant, make)` returns the `ModelFacts` of one catalog model at
one quant: from `QWENRUN_HOME/cache/catalog-facts/<model>.json` when that file was written by
this very code (a stamp of the qwenrun version and the source of the modules the facts come
from: catalog, recipes, facts), else from `make()` (the estimate, ~10 ms per quant), written
back atomically. The facts are a pure function of the catalog and the recipes, so the cache
never changes an answer; a missing, foreign, stale or unreadable file only means computing
again, and a home that cannot be written only means not keeping them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrun import __version__, config
from qwenrun.atomic import write_atomic
from qwenrun.planner.facts import ModelFacts

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec


@functools.lru_cache(maxsize=1)
def _stamp() -> str:
    """What the cached facts depend on: this version and the source that computes them."""
    from qwenrun import catalog
    from qwenrun.planner import facts, recipes

    h = hashlib.sha256(__version__.encode())
    for module in (catalog, facts, recipes):
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()[:16]


def _path(spec: ModelSpec) -> Path:
    return config.qwenrun_home() / "cache" / "catalog-facts" / f"{spec.name}.json"


# One model's entries, as read from disk (or made) in this process: quant -> JSON value.
_loaded: dict[str, dict[str, Any]] = {}


def _entries(spec: ModelSpec) -> dict[str, Any]:
    if spec.name not in _loaded:
        entries: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(_path(spec).read_text("utf-8"))
            if isinstance(doc, dict) and doc.get("stamp") == _stamp():
                entries = dict(doc.get("facts") or {})
        _loaded[spec.name] = entries
    return _loaded[spec.name]


def _save(spec: ModelSpec, entries: dict[str, Any]) -> None:
    path = _path(spec)
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps({"stamp": _stamp(), "facts": entries}))


def cached_facts(spec: ModelSpec, quant: str, make: Callable[[], ModelFacts]) -> ModelFacts:
    entries = _entries(spec)
    found = entries.get(quant)
    if found is not None:
        try:
            return ModelFacts.from_json(found)
        except (KeyError, TypeError, ValueError):
            pass  # written by something else: make it again
    facts = make()
    entries[quant] = facts.to_json()
    _save(spec, entries)
    return facts
