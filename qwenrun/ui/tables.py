"""Tables on stdout: the machine, a plan, the best plan per model, the cached models, bench
results, a server's models.

Contract: turns `HardwareProfile`, `Plan`, cache, bench and served-model values into rich
renderables (or plain rows) and prints them to stdout; the one-line verdict under a bench table
is chrome, on stderr. It decides nothing (the bench table's star follows the planner's rule,
`offload.clearly_faster`) and reads nothing from the machine. When stdout is not a terminal (a
pipe, a file), rich writes plain text with no escape codes, at a fixed width so that lines do
not wrap at 80 columns.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qwenrun import errors, units
from qwenrun.engine.loadconfig import layer_ranges
from qwenrun.hub.refs import reference_for
from qwenrun.hwprobe import HardwareProfile
from qwenrun.offload import DevicePlan, Plan, clearly_faster
from qwenrun.ui.console import info, show
from qwenrun.units import gib as fmt_bytes

if TYPE_CHECKING:
    from qwenrun.bench.measure import Report, StoredGroup
    from qwenrun.catalog import ModelSpec
    from qwenrun.hub.cache import CachedQuant

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


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


def _device_column(dev: DevicePlan, table: bool) -> list[str]:
    b = dev.bytes
    return [
        fmt_bytes(b.weights_dense),
        fmt_bytes(b.weights_experts),
        *([fmt_bytes(b.ngram_table) if b.ngram_table else "-"] if table else []),
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
    # One column per device (a spread lists each GPU and each worker's devices); one GPU is
    # shown first, then this machine's RAM, as before.
    devices = list(plan.devices) if plan.spread else [d for d in (plan.gpu, plan.cpu) if d]
    for d in devices:
        head = "RAM" if d.kind == "cpu" else "GPU" if d.kind == "gpu" else "WORKER"
        t.add_column(f"{head}: {d.name}", justify="right")
    table = plan.ngram_table is not None  # a row of its own, only for a model with one
    labels = [
        "weights (dense)",
        "weights (routed experts)",
        *(["n-gram table"] if table else []),
        "KV cache",
        "recurrent state",
        "compute buffers",
        "planned use",
        "kept free (CUDA context + margin / OS)",
        "capacity (free now)",
    ]
    columns = [_device_column(d, table) for d in devices]
    for i, label in enumerate(labels):
        t.add_row(label, *(c[i] for c in columns))
    return t


def plan_summary(plan: Plan) -> Table:
    native = f"native {plan.native_ctx:,}" if plan.native_ctx else "native unknown"
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    est = " (estimated from the catalog)" if plan.estimated else ""
    t.add_row("Model", plan.model)
    t.add_row("Quant", f"{plan.quant}, {fmt_bytes(plan.size_bytes)}{est}")
    if plan.files:
        t.add_row("Files", ", ".join(plan.files))
    t.add_row(
        "Context",
        f"{plan.n_ctx:,} tokens ({native}), KV {plan.load.kv_type}",
    )
    t.add_row("Placement", placement_text(plan))
    table = plan.ngram_table
    if table is not None:
        where = (
            "in RAM, read whole at load"
            if table.place == "ram"
            else "in the file on disk, its rows read as needed (wants a fast local SSD)"
        )
        t.add_row("N-gram table", f"{fmt_bytes(table.n_bytes)} {where}")
    t.add_row(
        "Predicted",
        f"decode ≈ {plan.decode_tok_s:.1f} tok/s, prefill ≈ {plan.prefill_tok_s:,.0f} tok/s "
        "(a short chat; a 512-token prompt)",
    )
    return t


def placement_text(plan: Plan) -> str:
    p = plan.load.placement
    if plan.spread:
        return _spread_text(plan)
    if plan.gpu is None:
        return "all on the CPU"
    # llama.cpp takes any count (999: all); more than the model has is all of them.
    ngl = f"{p.n_gpu_layers} layers"
    if p.n_gpu_layers < 0 or (plan.n_layer and p.n_gpu_layers > plan.n_layer):
        ngl = f"all {plan.n_layer} layers" if plan.n_layer else "all layers"
    if plan.n_layer and plan.gpu_expert_layers == plan.n_layer:
        experts = "every layer's experts on the GPU"
    else:
        experts = f"experts of {plan.cpu_expert_layers} of {plan.n_layer} layers on the CPU"
        if p.expert_cpu_tensors:
            experts += f" (one partly: {len(p.expert_cpu_tensors)} tensor(s))"
    return f"GPU: {ngl}; {experts}"


def _spread_text(plan: Plan) -> str:
    """`layers 0-29 on worker 10.0.0.2:50052, 30-59 on CUDA0; experts of 51 of 60 layers in
    RAM`."""
    layout = plan.layout
    assert layout is not None and layout.spread is not None
    spread = layout.spread
    runs = []
    if spread.cpu_layers:
        runs.append(f"{layer_ranges(range(spread.cpu_layers))} on this CPU")
    for st, r in zip(spread.stages, spread.ranges(), strict=True):
        t = spread.targets[st.target]
        where = t.where if t.remote else t.buffer
        runs.append(f"{layer_ranges(r)} on {where}" + (f" {t.buffer}" if t.remote else ""))
    hosted = sum(len(spread.host_range(k)) for k in range(len(spread.stages)))
    text = "; ".join(runs)
    if plan.n_layer and hosted:
        text += f"; experts of {hosted} of {plan.n_layer} layers in RAM"
    return text


def plan_view(plan: Plan) -> RenderableType:
    reasons = Text("\n".join(f"- {r}" for r in plan.reasons))
    parts: list[RenderableType] = [plan_summary(plan), Text(""), bytes_table(plan), Text("")]
    if plan.warnings:
        warned = "\n".join(f"- {w}" for w in plan.warnings)
        parts += [Text("Note:", style="yellow"), Text(warned, style="yellow"), Text("")]
    return Group(*parts, Text("Why:"), reasons)


# --------------------------------------------------------------------------------------
# One row per model


@dataclass(frozen=True)
class ModelRow:
    name: str
    plan: Plan | None
    problem: str | None = None


def model_rows(
    results: Sequence[tuple[ModelSpec, Plan | errors.DoesNotFitError]],
) -> list[ModelRow]:
    """`offload.plan_catalog`'s answers as rows: the plan, or in a few words why none."""
    rows = []
    for spec, found in results:
        if isinstance(found, errors.DoesNotFitError):
            rows.append(ModelRow(spec.name, None, _short(found)))
        else:
            rows.append(ModelRow(spec.name, found))
    return rows


def _short(err: errors.DoesNotFitError) -> str:
    if err.need_bytes is not None and err.have_bytes is not None:
        return f"needs ≈{fmt_bytes(err.need_bytes)}, {fmt_bytes(err.have_bytes)} to give"
    return err.message


def probe_json(hw: HardwareProfile, rows: Sequence[ModelRow]) -> str:
    models: list[dict[str, Any]] = []
    for r in rows:
        entry: dict[str, Any] = {"model": r.name, "fits": r.plan is not None}
        entry["plan"] = r.plan.to_dict() if r.plan is not None else None
        entry["problem"] = r.problem
        models.append(entry)
    return json.dumps({"hardware": hw.to_dict(), "models": models}, indent=2)


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


# --------------------------------------------------------------------------------------
# The cache


def cache_rows(quants: Sequence[CachedQuant]) -> list[dict[str, Any]]:
    """`qwenrun list --json`: one object per cached quant."""
    return [
        {
            "reference": reference_for(c.repo, c.quant),
            "repo": c.repo,
            "revision": c.revision,
            "quant": c.quant,
            "size_bytes": c.size_on_disk,
            "expected_bytes": c.expected_size,
            "status": "complete" if c.complete else "partial",
            "verified": c.verified,
            "files": len(c.paths),
            "n_files": c.n_expected,
            "path": str(c.first) if c.first else None,
        }
        for c in quants
    ]


def print_cache(rows: Sequence[dict[str, Any]]) -> None:
    """`qwenrun list`: aligned columns, the path last (it may be long)."""
    header = ("REFERENCE", "SIZE", "STATUS", "VERIFIED", "PATH")
    lines = [
        (
            str(r["reference"]),
            units.gb(int(str(r["size_bytes"]))),
            str(r["status"])
            + ("" if r["status"] == "complete" else f" ({r['files']}/{r['n_files']} files)"),
            "yes" if r["verified"] else "no",
            str(r["path"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header) - 1)]
    for line in [header, *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1])


# --------------------------------------------------------------------------------------
# Bench results


@dataclass(frozen=True)
class BenchRow:
    label: str
    decode_runs: tuple[float, ...]  # tok/s of each run
    prefill: tuple[float, float, float]  # median, min, max
    failed: int = 0
    planned: bool = False

    @property
    def runs(self) -> int:
        return len(self.decode_runs)

    @property
    def decode(self) -> tuple[float, float, float]:  # median, min, max
        return _median_range(self.decode_runs)


def bench_winner(rows: Sequence[BenchRow]) -> int | None:
    """The row measured faster beyond the spread (`offload.clearly_faster`) than the planned
    row, or, without one, than every other row; the fastest median such; None: no
    measurable difference."""
    planned = [r for r in rows if r.planned]
    others = planned or list(rows)
    winners = [
        i
        for i, r in enumerate(rows)
        if not r.planned
        and all(clearly_faster(r.decode_runs, o.decode_runs) for o in others if o is not r)
    ]
    return max(winners, key=lambda i: rows[i].decode[0]) if winners else None


def bench_verdict(rows: Sequence[BenchRow]) -> str:
    """What the runs say, in one sentence (the rule: README, "qwenrun bench")."""
    win = bench_winner(rows)
    if win is not None:
        return (
            f"★ {rows[win].label} is faster beyond the spread of the runs: plans of this model "
            "take it from now on, while it fits"
        )
    return (
        "no measurable difference: the runs' spreads overlap, so the plan keeps its own "
        "placement (more --rounds can tell closer ones apart)"
    )


def bench_table(rows: Sequence[BenchRow], title: str) -> Table:
    """Medians with their spread (min-max); the placement measured faster beyond the spread
    marked (`bench_winner`), the plan's own pick named."""
    t = Table(title=title, title_justify="left")
    for col in ("placement", "decode tok/s", "spread", "prefill tok/s", "spread", "runs"):
        t.add_column(col, justify="left" if col == "placement" else "right")
    best = bench_winner(rows)
    for i, r in enumerate(rows):
        label = r.label + (" (planned)" if r.planned else "")
        if not r.runs:
            t.add_row(label, "-", "-", "-", "-", f"0 ({r.failed} failed)")
            continue
        mark = " ★" if i == best else ""
        t.add_row(
            label,
            f"{r.decode[0]:.1f}{mark}",
            f"{r.decode[1]:.1f}-{r.decode[2]:.1f}",
            f"{r.prefill[0]:,.0f}",
            f"{r.prefill[1]:,.0f}-{r.prefill[2]:,.0f}",
            f"{r.runs}" + (f" ({r.failed} failed)" if r.failed else ""),
        )
    return t


def _median_range(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    return (statistics.median(values), min(values), max(values))


def report_rows(report: Report) -> list[BenchRow]:
    """A bench report's placements as table rows, the planned one first."""
    return [
        BenchRow(
            c.label,
            tuple(r.decode_tok_s for r in report.runs if r.candidate == i and r.ok),
            (s.prefill_median, s.prefill_min, s.prefill_max),
            s.failed,
            planned=i == 0,
        )
        for i, (c, s) in enumerate(zip(report.candidates, report.summary, strict=True))
    ]


def show_bench_report(report: Report) -> None:
    """`qwenrun bench`: each placement's medians and spread, the planned one first, and
    what they say."""
    rows = report_rows(report)
    st = report.settings
    title = (
        f"{report.model['file']}: {st.rounds} rounds, {st.prompt_tokens}-token prompt, "
        f"{st.gen_tokens} tokens decoded (medians)"
    )
    show(bench_table(rows, title))
    info(bench_verdict(rows))


def show_bench_stored(groups: Sequence[StoredGroup]) -> None:
    """`qwenrun bench --show`: one table per model file measured on this machine."""
    for file in dict.fromkeys(g.model for g in groups):
        rows = [
            BenchRow(g.label, tuple(g.decode), _median_range(g.prefill), g.failed)
            for g in groups
            if g.model == file
        ]
        show(bench_table(rows, f"{file} on this machine"))


# --------------------------------------------------------------------------------------
# A server's models


def print_served(url: str, models: Sequence[dict[str, Any]]) -> None:
    """`qwenrun ps`: each model a server has loaded, and what it is doing."""
    for card in models:
        served = card.get("qwenrun") or {}
        busy = "generating" if served.get("busy") else "idle"
        if served.get("waiting"):
            busy += f", {served['waiting']} waiting"
        print(f"{card.get('id')} · {served.get('status', 'ready')} · {url}")
        rows = [
            ("model", served.get("name")),
            ("context", f"{served['n_ctx']:,} tokens" if served.get("n_ctx") else None),
            ("placement", served.get("placement_text")),
            ("requests", busy),
            ("uptime", f"{served['uptime_s']:.0f} s" if "uptime_s" in served else None),
            ("file", served.get("path")),
        ]
        for key, value in rows:
            if value:
                print(f"  {key:<10} {value}")
