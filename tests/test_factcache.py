"""The on-disk cache of the catalog's planner facts: it may make planning faster, never
different; a foreign, stale or broken file only means computing again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwenrun import catalog, offload
from qwenrun.planner import factcache, recipes, sources
from qwenrun.planner.facts import ModelFacts
from qwenrun.testing.hardware import machine

SPEC = catalog.lookup("qwen3-30b-a3b")


def _fresh_process_state() -> None:
    # What a new `qwenrun` process starts with: nothing read from disk yet.
    factcache._loaded.clear()
    sources._catalog_option.cache_clear()


def _cache_file() -> Path:
    return Path(os.environ["QWENRUN_HOME"]) / "cache" / "catalog-facts" / f"{SPEC.name}.json"


def test_cached_facts_are_the_computed_facts():
    direct = ModelFacts.from_info(recipes.estimate(SPEC, "Q4_K_M"))
    _fresh_process_state()
    made = factcache.cached_facts(SPEC, "Q4_K_M", lambda: direct)
    assert made == direct and _cache_file().is_file()
    _fresh_process_state()

    def never() -> ModelFacts:
        raise AssertionError("the cache should have answered")

    assert factcache.cached_facts(SPEC, "Q4_K_M", never) == direct


@pytest.mark.slow
def test_plans_are_the_same_with_a_warm_cache():
    _fresh_process_state()
    cold = offload.plan_for_spec(SPEC, machine(12, 32))
    _fresh_process_state()
    warm = offload.plan_for_spec(SPEC, machine(12, 32))
    assert warm.to_dict() == cold.to_dict()


@pytest.mark.slow
def test_a_stale_or_broken_cache_is_computed_again():
    _fresh_process_state()
    offload.plan_for_spec(SPEC, machine(12, 32))
    doc = json.loads(_cache_file().read_text())
    stale = {"stamp": "another-version", "facts": {q: {"bogus": 1} for q in doc["facts"]}}
    _cache_file().write_text(json.dumps(stale))
    _fresh_process_state()
    assert offload.plan_for_spec(SPEC, machine(12, 32)).quant  # planned, from fresh facts
    _cache_file().write_text('{"stamp": ')  # cut short
    _fresh_process_state()
    assert offload.plan_for_spec(SPEC, machine(12, 32)).quant
    # Entries of the right stamp but the wrong shape are made again too.
    doc = json.loads(_cache_file().read_text())
    doc["facts"] = {q: {"bogus": 1} for q in doc["facts"]}
    _cache_file().write_text(json.dumps(doc))
    _fresh_process_state()
    assert offload.plan_for_spec(SPEC, machine(12, 32)).quant
