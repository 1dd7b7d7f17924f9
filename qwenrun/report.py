"""Tables for `qwenrun probe` and `qwenrun plan`: the machine, a plan, one plan per model.

Contract: turns `HardwareProfile` and `Plan` values into rich renderables and prints them to
stdout. It decides nothing and reads nothing from the machine. When stdout is not a
terminal (a pipe, a file), rich writes plain text with no escape codes, at a fixed width so
that lines do not wrap at 80 columns.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from qwenrun.hwprobe import HardwareProfile
from qwenrun.offload import DevicePlan, Plan, fmt_bytes

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
PIPE_WIDTH = 120


def stdout_console(file: TextIO | None = None) -> Console:
    out = file or sys.stdout
    tty = out.isatty()
    return Console(
        file=out,
        highlight=False,
        no_color=not tty,
        force_terminal=tty,
        width=None if tty else PIPE_WIDTH,
    )


def show(renderable: RenderableType, file: TextIO | None = None) -> None:
    stdout_console(file).print(renderable)


# --------------------------------------------------------------------------------------
# The machine


def hardware_table(hw: HardwareProfile) -> Table:
    t = Table(title="This machine", title_justify="left", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    if hw.gpus:
        for g in hw.gpus:
            parts = [f"{g.name}", f"{fmt_bytes(g.total_bytes)} ({fmt_bytes(g.free_bytes)} free)"]
            if g.compute_capability:
                parts.append(f"compute {g.compute_capability[0]}.{g.compute_capability[1]}")
            if g.mem_bandwidth_gbs:
                parts.append(f"{g.mem_bandwidth_gbs:.0f} GB/s")
            if g.pcie:
                parts.append(f"PCIe {g.pcie}")
            if g.driver:
                parts.append(f"driver {g.driver}")
            t.add_row(f"GPU {g.index}", ", ".join(parts))
    else:
        t.add_row("GPU", "none found (NVML and nvidia-smi see no NVIDIA GPU)")
    if hw.gpu_offload is not None:
        t.add_row("llama.cpp", "can use the GPU" if hw.gpu_offload else "CPU-only build")
    t.add_row("CPU", f"{hw.cpu_model}, {hw.physical_cores} cores / {hw.logical_cores} threads")
    simd = [f for f in SIMD_FLAGS if f in hw.cpu_flags]
    t.add_row("CPU features", " ".join(simd) if simd else "no AVX2 (slow)")
    t.add_row(
        "RAM",
        f"{fmt_bytes(hw.ram_total_bytes)} ({fmt_bytes(hw.ram_available_bytes)} available), "
        f"swap {fmt_bytes(hw.swap_total_bytes)}",
    )
    if hw.cpu_bandwidth_gbs:
        source = "measured" if hw.cpu_bandwidth_source == "measured" else "default, not measured"
        t.add_row("RAM bandwidth", f"{hw.cpu_bandwidth_gbs:.0f} GB/s ({source})")
    if hw.disk_free_bytes is not None:
        t.add_row("Disk free", f"{fmt_bytes(hw.disk_free_bytes)} (Hugging Face cache)")
    for note in hw.notes:
        t.add_row("Note", note)
    return t


# --------------------------------------------------------------------------------------
# One plan


def _device_column(dev: DevicePlan) -> list[str]:
    b = dev.bytes
    return [
        fmt_bytes(b.weights_dense),
        fmt_bytes(b.weights_experts),
        fmt_bytes(b.kv),
        fmt_bytes(b.rs) if b.rs else "-",
        fmt_bytes(b.compute + b.output),
        fmt_bytes(b.used),
        fmt_bytes(dev.reserved),
        fmt_bytes(dev.capacity),
    ]


def bytes_table(plan: Plan) -> Table:
    t = Table(title="Memory by device", title_justify="left")
    t.add_column("")
    devices = [d for d in (plan.gpu, plan.cpu) if d is not None]
    for d in devices:
        t.add_column(f"{d.kind.upper()}: {d.name}", justify="right")
    labels = [
        "weights (dense)",
        "weights (routed experts)",
        "KV cache",
        "recurrent state",
        "compute buffers",
        "planned use",
        "kept free (CUDA context + margin / OS)",
        "capacity (free now)",
    ]
    columns = [_device_column(d) for d in devices]
    for i, label in enumerate(labels):
        t.add_row(label, *(c[i] for c in columns))
    return t


def plan_summary(plan: Plan) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    est = " (estimated from the catalog)" if plan.estimated else ""
    t.add_row("Model", plan.model)
    t.add_row("Quant", f"{plan.quant}, {fmt_bytes(plan.size_bytes)}{est}")
    if plan.files:
        t.add_row("Files", ", ".join(plan.files))
    t.add_row(
        "Context", f"{plan.n_ctx:,} tokens (native {plan.native_ctx:,}), KV {plan.load.kv_type}"
    )
    t.add_row("Placement", placement_text(plan))
    t.add_row(
        "Predicted",
        f"decode ≈ {plan.decode_tok_s:.1f} tok/s, prefill ≈ {plan.prefill_tok_s:.0f} tok/s (rough)",
    )
    return t


def placement_text(plan: Plan) -> str:
    p = plan.load.placement
    if plan.gpu is None:
        return "all on the CPU"
    ngl = "all layers" if p.n_gpu_layers < 0 else f"{p.n_gpu_layers} layers"
    if plan.n_layer and plan.gpu_expert_layers == plan.n_layer:
        experts = "every layer's experts on the GPU"
    else:
        experts = f"experts of {plan.cpu_expert_layers} of {plan.n_layer} layers on the CPU"
        if p.expert_cpu_tensors:
            experts += f" (one partly: {len(p.expert_cpu_tensors)} tensor(s))"
    return f"GPU: {ngl}; {experts}"


def plan_view(plan: Plan) -> RenderableType:
    reasons = Text("\n".join(f"- {r}" for r in plan.reasons))
    return Group(plan_summary(plan), Text(""), bytes_table(plan), Text(""), Text("Why:"), reasons)


# --------------------------------------------------------------------------------------
# One row per model


@dataclass(frozen=True)
class ModelRow:
    name: str
    plan: Plan | None
    problem: str | None = None


def models_table(rows: Sequence[ModelRow]) -> Table:
    t = Table(title="Best plan per model (estimated sizes)", title_justify="left")
    for col in ("model", "quant", "context", "experts on CPU", "decode tok/s", "memory"):
        t.add_column(
            col,
            justify="right" if col in ("context", "decode tok/s") else "left",
            no_wrap=col in ("model", "quant"),
        )
    for r in rows:
        if r.plan is None:
            t.add_row(r.name, "-", "-", "-", "-", f"does not fit: {r.problem or ''}")
            continue
        p = r.plan
        experts = (
            f"{p.cpu_expert_layers}/{p.n_layer} layers" if p.gpu is not None else "all (no GPU)"
        )
        mem = fmt_bytes(p.cpu.bytes.used)
        if p.gpu is not None:
            mem = f"{fmt_bytes(p.gpu.bytes.used)} VRAM + {mem} RAM"
        else:
            mem += " RAM"
        t.add_row(r.name, p.quant, f"{p.n_ctx:,}", experts, f"{p.decode_tok_s:.1f}", mem)
    return t
