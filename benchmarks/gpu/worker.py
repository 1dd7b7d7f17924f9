"""The measuring process of the GPU kit: runs placements the way `qwenrun bench` does.

Contract: started by measure.py with its stdin and stdout as pipes. Each stdin line is one job
(JSON: model path, the placement as `LoadConfig` and `Layout` fields, the round, the
`BenchSettings`); for each, the worker calls `qwenrun.bench.runner.measure_once` (load,
warm-up, a fixed prompt, exactly `gen_tokens` greedy tokens, close) and answers one stdout
line `RESULT {json}`: the `Run`, llama.cpp's buffers, and NVML's used memory just before the
engine closed and again after (the GPU footprint is that minus measure.py's baseline, taken
before this process existed). Anything else on stdout is noise to ignore. One process serves
many jobs, as `qwenrun bench` does in one process: CUDA's context and kernel modules are set
up once, not inside a measured run. measure.py restarts it if it dies or hangs.

    python benchmarks/gpu/worker.py     (stdin: jobs, one JSON object a line)
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qwenrun.bench import runner  # noqa: E402
from qwenrun.bench.candidates import Candidate  # noqa: E402
from qwenrun.engine.loadconfig import LoadConfig, Placement  # noqa: E402
from qwenrun.planner.costs import Layout  # noqa: E402

MIB = 1 << 20
_seen: dict[str, Any] = {}
_nvml: Any = None


def nvml_used_mib() -> float | None:
    """NVML's used memory of GPU 0 in MiB; None without NVML or a GPU."""
    global _nvml
    if _nvml is False:
        return None
    try:
        import pynvml

        if _nvml is None:
            pynvml.nvmlInit()
            _nvml = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetMemoryInfo(_nvml).used) / MIB
    except Exception:
        if _nvml is None:
            _nvml = False  # no NVML or no GPU here: do not ask again
        return None


def load_config_of(d: dict[str, Any]) -> LoadConfig:
    p = dict(d["placement"])
    placement = Placement(
        n_gpu_layers=p["n_gpu_layers"],
        cpu_moe_all=p["cpu_moe_all"],
        expert_cpu_layers=tuple(p["expert_cpu_layers"]),
        expert_cpu_tensors=tuple(p["expert_cpu_tensors"]),
        extra_overrides=tuple((a, b) for a, b in p["extra_overrides"]),
    )
    rest = {k: v for k, v in d.items() if k != "placement"}
    return LoadConfig(placement=placement, **rest)


def layout_of(d: dict[str, Any]) -> Layout:
    return Layout(**{**d, "cpu_tensors": tuple(d["cpu_tensors"])})


class _Recording:
    """Stands in for `Engine` inside `runner`: loads the real one and, when `measure_once`
    closes it, notes NVML's used memory and llama.cpp's buffers first."""

    @staticmethod
    def load(path: Any, config: Any = None, **kw: Any) -> Any:
        from qwenrun.engine.llama import Engine

        engine = Engine.load(path, config, **kw)
        real_close = engine.close

        def close() -> None:
            if "used_mib" not in _seen:
                _seen["used_mib"] = nvml_used_mib()
                rep = engine.placement
                _seen["buffers"] = (
                    [[b.kind, b.buft, b.n_bytes] for b in rep.buffers] if rep else None
                )
                _seen["n_overridden"] = len(rep.overridden_tensors) if rep else None
                _seen["n_threads"] = getattr(engine.config, "n_threads", None)
            real_close()

        engine.close = close  # type: ignore[method-assign]
        return engine


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    cand = Candidate(job["label"], load_config_of(job["load"]), layout_of(job["layout"]))
    settings = runner.BenchSettings(**job["settings"])
    _seen.clear()
    t0 = time.perf_counter()
    try:
        run = runner.measure_once(Path(job["model"]), cand, 0, job["round"], settings)
        out = asdict(run)
    except Exception as err:  # a failure of this run, not of the worker
        traceback.print_exc(file=sys.stderr)
        out = asdict(runner.Run(0, job["round"], error=f"{type(err).__name__}: {err}"))
    return {
        "id": job["id"],
        "run": out,
        "used_mib": _seen.get("used_mib"),
        "idle_mib": nvml_used_mib(),
        "buffers": _seen.get("buffers"),
        "n_overridden": _seen.get("n_overridden"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> int:
    runner.Engine = _Recording  # type: ignore[misc,assignment]
    nvml_used_mib()  # NVML up before the first job: it reads no CUDA context
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        result = run_job(json.loads(line))
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
