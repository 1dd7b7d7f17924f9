"""The planner's choices before anything is loaded (planner/reference.py, planner/defaults.py):
the quant a pull downloads, and the model `qwenrun chat` runs when none is named."""

from __future__ import annotations

import pytest

from qwenrun import catalog, errors, offload
from qwenrun.hub.listing import HubFile, QuantFiles, RepoListing
from qwenrun.hub.refs import parse_ref
from qwenrun.planner import recipes
from qwenrun.testing.hardware import machine

# ---- which quant to download: the planner's pick among what the repo holds


def listing(spec: catalog.ModelSpec, quants: list[str]) -> RepoListing:
    files = []
    for q in quants:
        size = recipes.estimate(spec, q).total_bytes
        files.append(QuantFiles(q, (HubFile(f"{spec.display}-{q}.gguf", size, "0" * 64, None),)))
    return RepoListing(spec.repos[0], "main", tuple(files), ())


def test_planner_chooses_what_fits_the_machine():
    spec = catalog.lookup("qwen3-30b-a3b")
    ref = parse_ref(spec.name)
    offer = listing(spec, ["Q8_0", "Q4_K_M", "Q2_K"])
    small = offload.planner_chooser(machine(8, 24))(ref, offer)
    big = offload.planner_chooser(machine(80, 128))(ref, offer)
    assert small.quant == "Q4_K_M"
    assert big.quant == "Q8_0"


def test_nothing_fits_is_said_before_any_download():
    spec = catalog.lookup("qwen3-235b-a22b")
    with pytest.raises(errors.DoesNotFitError):
        offload.planner_chooser(machine(None, 16))(parse_ref(spec.name), listing(spec, ["Q4_K_M"]))


# ---- the model `qwenrun chat` picks when none is named


@pytest.mark.slow
def test_default_model_grows_with_the_machine():
    laptop, _, why = offload.default_model(machine(8, 32))
    workstation, _, _ = offload.default_model(machine(80, 256))
    size = {s.name: s.params_total for s in catalog.CATALOG}
    assert size[workstation] > size[laptop]
    assert catalog.lookup(laptop).thinking == "hybrid"
    assert why and "fits this machine" in why[0]


@pytest.mark.slow
def test_default_model_refuses_a_machine_too_small():
    with pytest.raises(errors.DoesNotFitError, match="no Qwen MoE model"):
        offload.default_model(machine(None, 4))
