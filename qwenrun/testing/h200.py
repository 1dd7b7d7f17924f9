"""The H200 measurements of 2026-11-27 as values: the GPU kit's results, read back.

Contract: reads benchmarks/gpu/h200-2026-11-27/ (results.jsonl and measure.log) from a source
checkout and gives each run as a `speed.Measurement`: the placement as a planner `Layout`
(first N, last N, llama.cpp's --fit, plain layer offload), the H200 box as a
`HardwareProfile` (with the RAM bandwidth its measuring process probed), and what was
measured. Shared by the speed model's tests and `benchmarks/speed_model.py`. The data are
measurements, not outputs of qwenrun.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from qwenrun.hwprobe import GPUInfo, HardwareProfile
from qwenrun.planner import speed
from qwenrun.planner.costs import CpuMoeFrom, Layout
from qwenrun.planner.facts import ModelFacts
from qwenrun.units import GIB

DATA = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "gpu" / "h200-2026-11-27"
N_LAYER = 48


def h200(cpu_bw: float) -> HardwareProfile:
    gpu = GPUInfo(
        index=0,
        name="NVIDIA H200",
        total_bytes=141 * GIB,
        free_bytes=140 * GIB,
        used_bytes=GIB,
        compute_capability=(9, 0),
        mem_bandwidth_gbs=4814.0,  # what qwenrun's probe read from NVML on that box
        pcie="5.0 x16",
    )
    return HardwareProfile(
        gpus=(gpu,),
        ram_total_bytes=126 * GIB,
        ram_available_bytes=120 * GIB,
        swap_total_bytes=0,
        cpu_model="Intel(R) Xeon(R) Processor",
        physical_cores=16,
        logical_cores=16,
        cpu_flags=frozenset({"avx2", "avx512f"}),
        cpu_bandwidth_gbs=cpu_bw,
        cpu_bandwidth_source="measured",
    )


def layout_of(cfg: dict) -> Layout:
    """The placement a config ran, as a `Layout` (first-N, last-N, --fit's, layer offload)."""
    ngl = cfg.get("n_gpu_layers", -1) or -1
    base = Layout(n_ctx=cfg["n_ctx"], kv_type=cfg["kv_type"], n_gpu_layers=ngl)
    if cfg.get("cpu_moe_all"):
        return replace(base, n_cpu_moe=N_LAYER)
    layers = list(cfg.get("expert_cpu_layers") or ())
    tensors = list(cfg.get("expert_cpu_tensors") or ())
    for pattern, _buft in cfg.get("extra_overrides") or ():
        m = re.match(r"blk\\\.(\d+)\\\.ffn_(\w*)(\.\*|\()", pattern)
        assert m, pattern
        layer = int(m.group(1))
        if m.group(3) == ".*":  # `blk\.30\.ffn_down.*`: one tensor of the boundary layer
            tensors.append(f"blk.{layer}.ffn_{m.group(2)}_exps.weight")
        elif layer < N_LAYER:
            layers.append(layer)
    if not layers:
        return base
    last = layers[-1] == N_LAYER - 1 and layers[0] != 0
    order: CpuMoeFrom = "last" if last else "first"
    assert layers == list(range(layers[0], layers[0] + len(layers)))
    return replace(base, n_cpu_moe=len(layers), cpu_tensors=tuple(tensors), cpu_moe_from=order)


def runs() -> list[tuple[str, dict, float, float, float]]:
    """(name, cfg, measured decode, measured prefill, RAM bandwidth its process probed)."""
    bw_by_name: dict[str, float] = {}
    bw = 0.0
    for line in (DATA / "measure.log").read_text().splitlines():
        if m := re.search(r"hw: .* cpu_bw ([\d.]+)", line):
            bw = float(m.group(1))
        elif m := re.search(r"\] (\S+): decode", line):
            bw_by_name[m.group(1)] = bw
    out = []
    for line in (DATA / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        s = r["stats"]
        out.append(
            (r["name"], r["cfg"], s["decode_tok_s"], s["prefill_tok_s"], bw_by_name[r["name"]])
        )
    return out


def measurements(facts: ModelFacts) -> list[speed.Measurement]:
    out = []
    for name, cfg, decode, prefill, bw in runs():
        layout = layout_of(cfg)
        out.append(
            speed.Measurement(
                work=speed.work_of(facts, layout),
                machine=speed.machine_of(h200(bw), has_gpu=True),
                # decode ran from 512 to 640 tokens of context
                context_tokens=cfg["prompt"] + cfg["gen"] // 2,
                decode_tok_s=decode,
                prompt_tokens=cfg["prompt"],
                prefill_tok_s=prefill,
                name=name,
            )
        )
    return out
