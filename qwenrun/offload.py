"""The offload planner's front door: where a model's bytes go on this machine, and why.

Contract: the names the rest of qwenrun plans with, gathered from `planner/`, and the map of
that room. Nothing inside `planner/` imports this module. A newcomer asking "where does the
planner decide X" starts here:

| question | module |
|---|---|
| what the user fixed, and the one check of it (`Wishes`) | `planner/wishes.py` |
| what a GGUF holds, per layer (`ModelFacts`) | `planner/facts.py` |
| one quant's tensors, files and size (`QuantOption`) | `planner/options.py` |
| the devices a plan may fill, each with its share (`Target`) | `planner/targets.py` |
| all of them together, and whether a layout fits (`Budget`) | `planner/budget.py` |
| what llama.cpp allocates on each device for a layout (`Layout`) | `planner/costs.py` |
| which context and placement fit, fastest first (`fit_option`) | `planner/search.py` |
| the placement over several GPUs or workers (`place_spread`) | `planner/spread.py` |
| how fast a placement decodes and prefills | `planner/speed.py`, `planner/spreadspeed.py` |
| which quant `--prefer` takes among those that fit | `planner/policy.py` |
| whether a `qwenrun bench` measurement beats the search | `planner/measured.py` |
| the plan of one model: quants in, `Plan` or `DoesNotFitError` out | `planner/decide.py` |
| the plan as values (`Plan`, `DevicePlan`) | `planner/result.py` |
| the plan in words | `planner/explain.py` |
| quants of a local file, a catalog model, a hub repo, the cache | `planner/sources.py` |
| `qwenrun plan MODEL`, and the quant a pull downloads | `planner/reference.py` |
| the model `chat` runs when none is named | `planner/defaults.py` |
| quant recipes and catalog estimates | `planner/recipes.py` |
| the catalog's facts kept on disk between runs | `planner/factcache.py` |

The rules, each stated in a plan's reasons when it matters: user settings are constraints,
not an off switch (a fixed quant, context, KV type or placement is kept and the rest fitted
around it); quality first, with a context of 16,384 tokens or more before it; within a quant
the context, then speed; routed experts leave the GPU before whole layers do; an n-gram table
(Qwen3.8-Flash-Next) is read into RAM when it fits beside everything else, else left in the
file; a measured placement wins only when it is faster beyond the spread of its runs.
"""

from __future__ import annotations

from qwenrun.planner.decide import load_config, plan, planned_threads
from qwenrun.planner.defaults import cached_instead, default_model, model_for_this_machine
from qwenrun.planner.measured import MeasuredPlacement, clearly_faster
from qwenrun.planner.options import QuantOption, quant_name_for
from qwenrun.planner.policy import BALANCED_ENOUGH_TOK_S, BALANCED_SHARE, FOUR_BIT
from qwenrun.planner.reference import plan_reference, planner_chooser
from qwenrun.planner.result import DevicePlan, Plan
from qwenrun.planner.sources import (
    OFFLINE_QUANTS,
    options_for_spec,
    plan_cached,
    plan_catalog,
    plan_for_file,
    plan_for_spec,
    plan_listing,
)
from qwenrun.planner.wishes import MIN_USER_CTX, Prefer, Wishes

__all__ = [
    "BALANCED_ENOUGH_TOK_S",
    "BALANCED_SHARE",
    "FOUR_BIT",
    "MIN_USER_CTX",
    "OFFLINE_QUANTS",
    "DevicePlan",
    "MeasuredPlacement",
    "Plan",
    "Prefer",
    "QuantOption",
    "Wishes",
    "cached_instead",
    "clearly_faster",
    "default_model",
    "load_config",
    "model_for_this_machine",
    "options_for_spec",
    "plan",
    "plan_cached",
    "plan_catalog",
    "plan_for_file",
    "plan_for_spec",
    "plan_listing",
    "plan_reference",
    "planned_threads",
    "planner_chooser",
    "quant_name_for",
]
