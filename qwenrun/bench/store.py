"""What `qwenrun bench` measured, kept under the qwenrun home, and what the planner learns.

Contract: every run is one JSON line in `QWENRUN_HOME/bench/runs.jsonl`, keyed by the machine
(`machine_key`: GPUs and their memory, CPU model and cores, RAM), the model file (its name,
size and quant) and the placement in the planner's terms (`Candidate.describe`), with the
settings, llama.cpp's numbers and the date. From them this module

- `refit(hw)`: fits the speed model (`planner.speed.fit`) to every stored run of this
  machine whose model file is still there, and keeps the parameters in
  `QWENRUN_HOME/bench/calibration.json`; `speed_params(hw)` reads them back (the start-up
  puts them into the machine's profile, `machine.py`), so every later plan predicts this
  machine's speed;
- `measured(hw, path)`: the placements measured for this model file on this machine, each
  with the decode speed of every run, as plain values for the planner (`planner.measured`
  decides whether one beats its own pick).

Runs of a plan over several devices are kept (and shown by `bench --show`) but take part in
neither: the speed model they would fit is the one-GPU one. A line that does not parse (a
half-written file, another version's format) is skipped. Writes raise `OSError` when the home
cannot take them; reads of a missing or unreadable store give nothing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qwenrun import __version__, config, errors
from qwenrun.atomic import write_atomic
from qwenrun.bench.candidates import Candidate
from qwenrun.bench.runner import BenchSettings, Run
from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.measured import MeasuredPlacement
from qwenrun.units import GIB


def runs_file() -> Path:
    return config.qwenrun_home() / "bench" / "runs.jsonl"


def calibration_file() -> Path:
    return config.qwenrun_home() / "bench" / "calibration.json"


def machine_key(hw: HardwareProfile) -> str:
    """What identifies a machine for measurements kept about it: its GPUs (name and memory),
    its CPU model, cores and RAM (rounded to GiB, so free memory moving about does not count)."""
    gpus = ",".join(f"{g.name}:{round(g.total_bytes / GIB)}G" for g in hw.gpus) or "no-gpu"
    ram = round(hw.ram_total_bytes / GIB)
    return f"{gpus}|{hw.cpu_model}|{hw.physical_cores}c/{hw.logical_cores}t|{ram}G"


def speed_params(hw: HardwareProfile) -> tuple[tuple[str, float], ...]:
    """The speed model's parameters `qwenrun bench` fitted on this machine, if any."""
    try:
        data = json.loads(calibration_file().read_text("utf-8"))
        params = data[machine_key(hw)]["params"]
        return tuple((str(k), float(v)) for k, v in params.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ()  # none yet, or unreadable: the defaults calibrated on the H200 apply


def _store_speed_params(key: str, params: dict[str, float], runs: int) -> None:
    """Keep the parameters fitted from `runs` measurements of this machine."""
    path = calibration_file()
    try:
        data = json.loads(path.read_text("utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"params": params, "runs": runs, "fitted_at": time.time()}
    write_atomic(path, json.dumps(data, indent=1))


def model_identity(path: Path, quant: str) -> dict[str, Any]:
    """A model file as measurements remember it: a re-downloaded copy is the same model."""
    from qwenrun.hub import names

    files = names.local_shards(path)
    return {
        "file": files[0].name,
        "path": str(files[0]),
        "size": sum(f.stat().st_size for f in files),
        "quant": quant,
    }


def save(
    hw: HardwareProfile,
    model: dict[str, Any],
    cands: Sequence[Candidate],
    runs: Sequence[Run],
    settings: BenchSettings,
) -> int:
    """Append the runs; returns how many were written."""
    from qwenrun.engine import native

    key = machine_key(hw)
    now = time.time()
    lines = []
    for r in runs:
        lines.append(
            json.dumps(
                {
                    "machine": key,
                    "model": model,
                    "placement": cands[r.candidate].describe(),
                    "settings": {
                        "prompt_tokens": settings.prompt_tokens,
                        "gen_tokens": settings.gen_tokens,
                        "rounds": settings.rounds,
                    },
                    "round": r.round,
                    "prefill_tok_s": r.prefill_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "ttft_ms": r.ttft_ms,
                    "generated_tokens": r.generated_tokens,
                    "load_s": r.load_s,
                    "error": r.error,
                    "at": now,
                    "qwenrun": __version__,
                    "llama_cpp_python": native.llama_cpp_version(),
                },
                separators=(",", ":"),
            )
        )
    path = runs_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return len(lines)


def records(key: str | None = None) -> Iterator[dict[str, Any]]:
    """The stored runs (of one machine when `key` is given), oldest first."""
    try:
        text = runs_file().read_text("utf-8")
    except OSError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the others still count
        if isinstance(rec, dict) and (key is None or rec.get("machine") == key):
            yield rec


# --------------------------------------------------------------------------------------
# What the planner learns


def measured(hw: HardwareProfile, path: Path) -> list[MeasuredPlacement]:
    """The placements `qwenrun bench` measured for this model file here, fastest median
    first."""
    try:
        ident = model_identity(path, "")
    except (OSError, errors.QwenrunError):  # a missing shard: nothing measured applies
        return []
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records(machine_key(hw)):
        model = rec.get("model") or {}
        if (model.get("file"), model.get("size")) != (ident["file"], ident["size"]):
            continue
        if rec.get("error") or not rec.get("decode_tok_s"):
            continue
        if (rec.get("placement") or {}).get("spread"):
            continue
        place = {k: v for k, v in (rec.get("placement") or {}).items() if k != "label"}
        groups[json.dumps(place, sort_keys=True)].append(rec)
    out = []
    for recs in groups.values():
        place = recs[-1]["placement"]
        try:
            out.append(
                MeasuredPlacement(
                    label=str(place["label"]),
                    n_gpu_layers=int(place["n_gpu_layers"]),
                    n_cpu_moe=int(place["n_cpu_moe"]),
                    cpu_moe_from=place["cpu_moe_from"],
                    cpu_tensors=tuple(place["cpu_tensors"]),
                    n_ubatch=int(place["n_ubatch"]),
                    use_gpu=bool(place["use_gpu"]),
                    threads=place.get("threads"),
                    use_mmap=place.get("use_mmap"),
                    decode_runs=tuple(float(r["decode_tok_s"]) for r in recs),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue  # another version's record
    return sorted(out, key=lambda m: -m.decode_tok_s)


def refit(hw: HardwareProfile) -> int:
    """Fit the speed model to this machine's stored runs and keep it; returns the runs used."""
    from qwenrun.hub import header
    from qwenrun.planner import speed
    from qwenrun.planner.costs import Layout
    from qwenrun.planner.facts import ModelFacts

    key = machine_key(hw)
    facts_of: dict[str, ModelFacts | None] = {}
    measurements = []
    for rec in records(key):
        if rec.get("error") or not rec.get("decode_tok_s"):
            continue
        if (rec.get("placement") or {}).get("spread"):
            continue
        model_path = str((rec.get("model") or {}).get("path", ""))
        if model_path not in facts_of:
            try:
                facts_of[model_path] = ModelFacts.from_info(header.read_local(model_path))
            except Exception:
                facts_of[model_path] = None
        facts = facts_of[model_path]
        place = rec.get("placement") or {}
        if facts is None:
            continue
        try:
            layout = Layout(
                n_ctx=int(place["n_ctx"]),
                kv_type=str(place["kv_type"]),
                n_gpu_layers=int(place["n_gpu_layers"]),
                n_cpu_moe=int(place["n_cpu_moe"]),
                cpu_tensors=tuple(place["cpu_tensors"]),
                n_ubatch=int(place["n_ubatch"]),
                use_gpu=bool(place["use_gpu"]),
                cpu_moe_from=place["cpu_moe_from"],
            )
        except (KeyError, TypeError, ValueError):
            continue
        settings = rec.get("settings") or {}
        prompt = int(settings.get("prompt_tokens", 0))
        gen = int(settings.get("gen_tokens", 0))
        measurements.append(
            speed.Measurement(
                work=speed.work_of(facts, layout),
                machine=speed.machine_of(hw, layout.use_gpu, place.get("threads")),
                context_tokens=prompt + gen // 2,
                decode_tok_s=float(rec["decode_tok_s"]),
                prompt_tokens=prompt,
                prefill_tok_s=float(rec.get("prefill_tok_s") or 0.0) or None,
                n_ubatch=layout.n_ubatch,
            )
        )
    if not measurements:
        return 0
    fitted = speed.fit(measurements)
    values = {k: float(v) for k, v in speed.describe(fitted).items() if v is not None}
    _store_speed_params(key, values, len(measurements))
    return len(measurements)
