"""What `qwenrun probe` and `qwenrun plan` do between the command line and the planner.

Contract: reads the machine (through `hwprobe`) and a model (a catalog name, offline from
its shapes, or a local GGUF header), asks `offload` for plans and shapes the results as
values and JSON. It prints nothing (`report.py` renders) and never loads llama.cpp unless
the machine has a GPU, when it asks the installed build whether it can use it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwenrun import catalog, errors, hwprobe, offload
from qwenrun.hwprobe import HardwareProfile
from qwenrun.report import ModelRow


def probe_machine(*, measure: bool = False) -> HardwareProfile:
    """This machine; with GPUs, whether llama.cpp can use them (loads llama.cpp once)."""
    hw = hwprobe.probe(measure=measure)
    if hw.gpus:
        hw = replace(hw, gpu_offload=hwprobe.gpu_offload_supported())
    return hw


def catalog_rows(hw: HardwareProfile) -> list[ModelRow]:
    """The best plan of every catalog model on `hw`, or why it does not fit."""
    rows = []
    for spec in catalog.CATALOG:
        try:
            rows.append(ModelRow(spec.name, offload.plan_for_spec(spec, hw)))
        except errors.DoesNotFitError as err:
            rows.append(ModelRow(spec.name, None, _short(err)))
    return rows


def _short(err: errors.DoesNotFitError) -> str:
    if isinstance(err, offload.ModelDoesNotFit):
        need, have = offload.fmt_bytes(err.need_bytes), offload.fmt_bytes(err.have_bytes)
        return f"needs ≈{need}, {have} to give"
    return err.message


def probe_json(hw: HardwareProfile, rows: list[ModelRow]) -> str:
    models: list[dict[str, Any]] = []
    for r in rows:
        entry: dict[str, Any] = {"model": r.name, "fits": r.plan is not None}
        entry["plan"] = r.plan.to_dict() if r.plan is not None else None
        entry["problem"] = r.problem
        models.append(entry)
    return json.dumps({"hardware": hw.to_dict(), "models": models}, indent=2)


def is_local_file(model: str) -> bool:
    return model.lower().endswith(".gguf") or Path(model).expanduser().is_file()


def plan_model(model: str, wishes: offload.Wishes) -> offload.Plan:
    """`qwenrun plan MODEL`: a local GGUF (exact bytes) or a catalog name (estimates)."""
    hw = probe_machine() if wishes.gpu_mem_bytes is None else hwprobe.probe()
    if is_local_file(model):
        path = Path(model).expanduser()
        if wishes.quant:
            q = wishes.quant
            raise errors.UsageError(
                "--quant chooses among a catalog model's quants; a file is one quant already",
                hint=f"drop --quant, or plan a catalog model: qwenrun plan NAME --quant {q}",
            )
        return offload.plan_for_file(path, hw, wishes)
    spec = catalog.lookup(model)
    return offload.plan_for_spec(spec, hw, wishes)
