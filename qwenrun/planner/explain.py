"""The plan in words: why this quant, context and placement, and what to try when none fits.

Contract: pure text from the values the search produced (`Fit`, `Usage`, `Speed`, `Budget`).
`reasons(...)` gives the plan's reasons, one line each, in the order a reader asks them:
quant, context, machine, placement, n-gram table, caches, speed, caveats; `table_plan(...)`
says where an n-gram table lives and why (`result.TablePlan`, which the planner computes
once and hands to both the plan and `reasons`). `does_not_fit(...)` builds the
`DoesNotFitError` that says what the smallest option needs, what the machine has, and the
nearest changes that do fit (found by calling back into the planner through `replan`).
It decides nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from qwenrun import catalog, errors
from qwenrun.engine.loadconfig import LoadConfig, layer_ranges
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, Spread, Usage, usage
from qwenrun.planner.facts import ModelFacts, pad_ctx
from qwenrun.planner.result import TablePlan
from qwenrun.planner.search import MIN_CTX, PREFERRED_MIN_CTX, Fit
from qwenrun.planner.speed import PLAN_CONTEXT_TOKENS, PLAN_PROMPT_TOKENS, Speed, params_for
from qwenrun.planner.spreadspeed import remote_splits
from qwenrun.planner.targets import machine_label
from qwenrun.units import GIB
from qwenrun.units import gib as fmt_bytes

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec
    from qwenrun.hwprobe import HardwareProfile
    from qwenrun.planner.options import QuantOption
    from qwenrun.planner.wishes import Wishes

Replan = Callable[["Wishes"], "str | None"]


def reasons(
    opt: QuantOption,
    facts: ModelFacts,
    fit: Fit,
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    rejected: list[tuple[QuantOption, ModelFacts]],
    load: LoadConfig,
    sp: Speed,
    bandwidth: tuple[float, float, str],
    table: TablePlan | None,
) -> list[str]:
    layout, use = fit.layout, fit.use
    gpu_bw, cpu_bw, cpu_bw_note = bandwidth
    out: list[str] = []
    if wishes.quant:
        out.append(f"quant {opt.name}, as asked")
    elif opt.local:
        out.append(f"quant {opt.name}: the file's own")
    elif rejected:
        better = ", ".join(f"{q.name} ({fmt_bytes(f.weight_bytes)})" for q, f in rejected[:3])
        more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
        out.append(f"{opt.name} is the best quant that fits; better ones do not: {better}{more}")
        if wishes.n_ctx is None and fit.layout.n_ctx >= PREFERRED_MIN_CTX:
            out[-1] += f" (with {PREFERRED_MIN_CTX:,} tokens of context or more)"
    else:
        out.append(f"{opt.name} is the best quant on offer, and it fits")
    out.append(f"context {layout.n_ctx:,} tokens: {fit.ctx_reason}")
    out.append(_machine_reason(hw, budget))
    out.extend(_placement_reasons(facts, layout, use, budget, hw))
    if table is not None:
        out.append(table.why)
        out.append(_classes_reason(facts))
    out.append(_cache_reason(facts, layout))
    out.append(_speed_reason(layout, sp, gpu_bw, cpu_bw, cpu_bw_note, bool(hw.speed_params)))
    if not hw.extra_bufts and hw.cpu_kernels:
        out.append(hw.cpu_kernels)
    if layout.use_gpu and not load.mmap_enabled():
        out.append("memory-mapping off: llama.cpp advises it when tensors are moved to the CPU")
    if opt.estimated:
        out.append(
            "sizes are estimated from the catalog's shapes and the quant's recipe; "
            "the downloaded file's header gives the exact bytes"
        )
    return out


def _machine_reason(hw: HardwareProfile, budget: Budget) -> str:
    ram = f"{fmt_bytes(budget.ram)} of RAM (after leaving the OS {fmt_bytes(budget.ram_reserved)})"
    remote = [t for t in budget.targets if t.remote]
    if remote or budget.n_gpus > 1:
        here = [f"{fmt_bytes(t.budget)} on {t.name}" for t in budget.local_gpus]
        text = "memory to plan with: " + ", ".join([*here, ram])
        by_worker: dict[str, list[str]] = {}
        for t in remote:
            by_worker.setdefault(t.machine, []).append(
                f"{fmt_bytes(t.budget)} of {'RAM' if t.is_ram else t.name.split(' of ')[0]}"
            )
        for w, parts in by_worker.items():
            text += f"; {machine_label(w)}: {', '.join(parts)}"
        if remote:
            rtt = max(t.round_trip_s for t in remote)
            text += f" (round trip {rtt * 1e3:.2f} ms)"
        return text + " (GPUs after the CUDA context and a safety margin)"
    if budget.has_gpu:
        return (
            f"memory to plan with: {fmt_bytes(budget.gpu)} of VRAM (after "
            f"{fmt_bytes(budget.gpu_reserved)} for the CUDA context and a safety margin) and {ram}"
        )
    why = "no GPU"
    if hw.gpus and hw.gpu_offload is False:
        why = "this llama.cpp build cannot use the GPU"
    return f"{why}: everything runs on the CPU with {ram}"


def _placement_reasons(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, hw: HardwareProfile
) -> list[str]:
    if layout.spread is not None:
        return _spread_reasons(facts, layout.spread)
    if not layout.use_gpu:
        out = ["all weights memory-mapped in RAM (n_gpu_layers 0)"]
        if budget.has_gpu:
            out.append("the GPU is left unused: it cannot hold even the output layer and buffers")
        return out
    out = []
    n = facts.n_layer
    if use.first_gpu_layer > 0:
        out.append(
            f"layers 0-{use.first_gpu_layer - 1} stay wholly on the CPU: "
            "the GPU cannot hold their attention weights as well"
        )
    if facts.is_moe:
        on_gpu = use.gpu_expert_layers
        if layout.n_cpu_moe == 0 and not layout.cpu_tensors:
            out.append(f"every layer's routed experts on the GPU ({n} layers)")
        else:
            cpu_layers = list(layout.cpu_expert_layers(n))
            text = f"routed experts of {layer_ranges(cpu_layers)} on the CPU" if cpu_layers else ""
            if layout.cpu_tensors:
                part = (
                    f"{len(layout.cpu_tensors)} expert tensor(s) of layer "
                    f"{layout.boundary_layer(n)} too (the rest of that layer fills the VRAM left "
                    "over)"
                )
                text = f"{text}, and {part}" if text else f"routed experts: {part} on the CPU"
            out.append(f"{text}; the other {on_gpu} layers' experts on the GPU")
            out.append(_order_reason(layout))
    out.append(
        "attention, norms, router"
        + (", shared experts" if facts.has_shared_expert else "")
        + " and the output layer on the GPU; the token embeddings stay on the CPU "
        "(llama.cpp always keeps the input layer there)"
    )
    return out


def _spread_reasons(facts: ModelFacts, spread: Spread) -> list[str]:
    """Which device runs which layers, where each one's experts are, and why so."""
    out = []
    n = facts.n_layer
    if spread.cpu_layers:
        out.append(
            f"{layer_ranges(range(spread.cpu_layers))} wholly on this machine's CPU "
            "(llama.cpp keeps the layers it does not offload first)"
        )
    targets = spread.targets
    for k, (st, r) in enumerate(zip(spread.stages, spread.ranges(), strict=True)):
        t = targets[st.target]
        where = f"{t.name}" + ("" if t.remote else " (this machine)")
        text = f"{layer_ranges(r)} on {where}"
        host_run = list(spread.host_range(k))
        if st.host is not None and (host_run or st.host_tensors) and facts.is_moe:
            host = targets[st.host]
            home = "this machine's RAM" if not host.remote else f"the RAM of {host.where}"
            parts = [f"the routed experts of {layer_ranges(host_run)}"] if host_run else []
            if st.host_tensors:
                parts.append(
                    f"{len(st.host_tensors)} expert tensor(s) of layer {r.stop - len(host_run) - 1}"
                )
            text += f", with {' and '.join(parts)} in {home}"
        elif t.is_ram:
            text += " (its RAM: no GPU takes them)"
        out.append(text)
    last = targets[spread.stages[-1].target] if spread.stages else None
    if last is not None:
        out.append(f"the output layer with the last layers, on {last.name}")
    machines = {t.machine for st in spread.stages for t in [targets[st.target]]}
    if len(machines) > 1 or any(m for m in machines):
        out.append(
            "each machine runs one contiguous block of layers, so a token crosses the network "
            "once per machine; experts stay on their own machine (a layer's experts on "
            "another machine would cost two crossings per layer)"
        )
    gpus = [t for t in targets if t.kind == "gpu"]
    if len(gpus) > 1:
        out.append(
            "this machine's GPUs share their layers in proportion to their free memory, "
            "each keeping the experts it has room for (not one pool: each stays within "
            "its own memory)"
        )
    if n and any(st.host is not None and st.host_layers for st in spread.stages):
        out.append(
            "the last layers of each GPU's block hand their experts to its machine's RAM first"
        )
    return out


def table_plan(
    facts: ModelFacts,
    layout: Layout,
    use: Usage,
    budget: Budget,
    wishes: Wishes,
    hw: HardwareProfile,
) -> TablePlan | None:
    """Where the n-gram table lives and why; None for a model without one."""
    if not facts.has_table:
        return None
    size = fmt_bytes(facts.table_bytes)
    asked = f", as asked (--ngram-table {wishes.ngram_table})" if wishes.ngram_table else ""
    if layout.ngram_table == "ram":
        why = f"the n-gram table ({size}) is read into RAM at load{asked}"
        if not asked:
            why += (
                ": it fits beside everything else, and each token's rows then come from "
                "memory, not from the disk"
            )
        return TablePlan("ram", facts.table_bytes, why)
    why = (
        f"the n-gram table ({size}) stays in the file and is read as tokens need its rows "
        f"(16 per token; llama.cpp's lazy read, not counted as RAM){asked}"
    )
    if not asked:
        short = facts.table_bytes - max(0, budget.ram - use.cpu.used)
        why += f": RAM is {fmt_bytes(short)} short of holding it beside everything else"
    per_token = params_for(hw).table_disk_token_s * 1e3
    why += (
        "; keep the model on a fast local SSD (NVMe, not a network or USB disk): each token "
        f"waits for those reads, about {per_token:.0f} ms per token in the predicted speed "
        "(a rough figure from one user's report); --ngram-table ram forces it into RAM"
    )
    return TablePlan("disk", facts.table_bytes, why)


def _classes_reason(facts: ModelFacts) -> str:
    """The weights by what they do, largest first (the n-gram table last: it is apart)."""
    parts = sorted(
        ((c, n) for c, n in facts.weight_classes if c != "n-gram table"), key=lambda x: -x[1]
    )
    text = ", ".join(f"{c} {fmt_bytes(n)}" for c, n in parts)
    return f"weights by class: {text}; the n-gram table {fmt_bytes(facts.table_bytes)} apart"


def _order_reason(layout: Layout) -> str:
    if layout.cpu_moe_from == "last":
        return (
            "the last layers' experts go to the CPU, as llama.cpp's --fit places them "
            "(--cpu-moe-from first keeps the first ones there instead)"
        )
    return "the first layers' experts go to the CPU, as llama.cpp's --n-cpu-moe places them"


def _cache_reason(facts: ModelFacts, layout: Layout) -> str:
    kv = facts.kv_bytes(layout.n_ctx, layout.kv_type)
    attn = len(facts.attn_layers)
    text = f"KV cache {fmt_bytes(kv)} ({layout.kv_type}"
    if facts.is_hybrid:
        indexer = " with their lightning indexer's keys" if facts.indexer_dim else ""
        text += (
            f", only the {attn} attention layers of {facts.n_layer}{indexer}; the other "
            f"{len(facts.recr_layers)} keep a fixed {fmt_bytes(facts.rs_bytes)} recurrent state)"
        )
    else:
        text += f", {attn} layers)"
    return text


def _speed_reason(
    layout: Layout, sp: Speed, gpu_bw: float, cpu_bw: float, note: str, calibrated: bool
) -> str:
    source = (
        "fitted to this machine's `qwenrun bench` runs"
        if calibrated
        else "calibrated on H200 measurements; `qwenrun bench` fits it to this machine"
    )
    parts = [
        f"predicted decode ≈ {sp.decode_tok_s:.0f} tok/s at {PLAN_CONTEXT_TOKENS:,} tokens of "
        f"context ({source}):"
    ]
    if sp.gpu_bytes_per_token:
        parts.append(
            f"{sp.gpu_bytes_per_token / 1e9:.2f} GB per token from VRAM (card peak "
            f"{gpu_bw:.0f} GB/s),"
        )
    parts.append(
        f"{sp.cpu_bytes_per_token / 1e9:.2f} GB from RAM ({cpu_bw:.0f} GB/s, {note}), plus "
        "fixed costs per layer and per token; prefill of a "
        f"{PLAN_PROMPT_TOKENS}-token prompt ≈ {sp.prefill_tok_s:,.0f} tok/s"
    )
    if layout.spread is not None:
        splits = remote_splits(layout.spread)
        if splits:
            n = sum(k for _, k in splits)
            rtt = max(t.round_trip_s for t, _ in splits)
            parts.append(
                f"(rough for several machines); {n} hand-off{'s' if n > 1 else ''} to workers per "
                f"token, each a round trip ({rtt * 1e3:.2f} ms) and the worker's own work"
            )
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# When nothing fits


def does_not_fit(
    rejected: list[tuple[QuantOption, ModelFacts]],
    hw: HardwareProfile,
    budget: Budget,
    wishes: Wishes,
    spec: ModelSpec | None,
    replan: Replan,
) -> errors.DoesNotFitError:
    """What the smallest option needs and the machine has; `replan(wishes)` tries a change
    and says what it would give ("Q4_K_M at context 4,096, about 12 tok/s"), or None."""
    opt, facts = min(rejected, key=lambda r: r[1].weight_bytes)
    ctx = wishes.n_ctx or min(facts.ctx_native or MIN_CTX, MIN_CTX)
    kv = (wishes.kv_type or "f16").lower()
    # An n-gram table needs no memory unless asked to be in RAM: it can stay in the file.
    table = wishes.ngram_table or "disk"
    base = Layout(n_ctx=pad_ctx(ctx), kv_type=kv, use_gpu=False, ngram_table=table)
    need = usage(facts, base, hw.cpu_flags)
    have = budget.total
    machine = f"{fmt_bytes(budget.ram)} of RAM"
    if budget.has_gpu:
        machine = f"{fmt_bytes(budget.gpu)} of VRAM + {machine}"
    remote = [t for t in budget.targets if t.remote]
    if remote:
        n = len({t.machine for t in remote})
        machine += f" + {fmt_bytes(sum(t.budget for t in remote))} on {n} worker"
        machine += "s" if n > 1 else ""
    if budget.has_gpu or remote:
        machine += f" ({fmt_bytes(have)})"
    # --gpu-mem / --ram / --worker describe another machine: "this machine" would be untrue.
    sizes = (
        ("--gpu-mem", wishes.gpu_mem_bytes),
        ("--ram", wishes.ram_bytes),
        ("--worker", wishes.workers or None),
    )
    asked = [flag for flag, size in sizes if size is not None]
    which = f"the machine you describe ({', '.join(asked)})" if asked else "this machine"
    message = (
        f"{facts.name} does not fit: its smallest option ({opt.name}, context {ctx:,}) needs "
        f"about {fmt_bytes(need.cpu.used)} (weights {fmt_bytes(facts.weight_bytes)}); "
        f"{which} can give {machine}"
    )
    if wishes.constraints():
        message += f" with {' '.join(wishes.constraints())}"
    alternatives = _alternatives(wishes, spec, facts, have, replan)
    if need.cpu.used > have:
        alternatives.append(_more_machines(need.cpu.used, budget))
    hint = (
        "try " + "; or ".join(alternatives)
        if alternatives
        else f"this needs a machine with about {fmt_bytes(need.cpu.used - have)} more memory"
    )
    return errors.DoesNotFitError(
        message, hint, tuple(alternatives), need_bytes=need.cpu.used, have_bytes=have
    )


def _alternatives(
    wishes: Wishes, spec: ModelSpec | None, smallest: ModelFacts, have: int, replan: Replan
) -> list[str]:
    """The nearest changes that do fit, best first."""
    out: list[str] = []
    relaxations: list[tuple[str, Wishes]] = []
    if wishes.quant:
        relaxations.append(("another quant", replace(wishes, quant=None)))
    if wishes.n_ctx is not None and wishes.n_ctx > MIN_CTX:
        relaxations.append((f"--ctx {MIN_CTX}", replace(wishes, n_ctx=MIN_CTX)))
    if wishes.cpu_moe:
        relaxations.append(("without --cpu-moe", replace(wishes, cpu_moe=False)))
    if wishes.n_cpu_moe is not None:
        label = f"without --n-cpu-moe {wishes.n_cpu_moe}"
        relaxations.append((label, replace(wishes, n_cpu_moe=None)))
    if wishes.n_gpu_layers is not None:
        label = f"without --gpu-layers {wishes.n_gpu_layers}"
        relaxations.append((label, replace(wishes, n_gpu_layers=None)))
    if (wishes.kv_type or "f16").lower() in ("f16", "bf16", "f32"):
        label = "--kv-type q8_0 (half the KV cache)"
        relaxations.append((label, replace(wishes, kv_type="q8_0")))
    for label, relaxed in relaxations:
        found = replan(relaxed)
        if found is not None:
            out.append(f"{label}: {found}")
    if spec is not None:
        out.extend(_smaller_models(spec, smallest, have))
    return out


def _more_machines(need: int, budget: Budget) -> str:
    """How many machines like this one (workers lending their GPUs and RAM) would hold it."""
    local = sum(t.budget for t in budget.targets if not t.remote) or 1
    remote = sum(t.budget for t in budget.targets if t.remote)
    more = max(1, -(-(need - local - remote) // local))
    return (
        f"{more} more machine{'s' if more > 1 else ''} like this one: run `qwenrun worker` "
        "on each and give their HOST:PORTs to --rpc (README: several machines)"
    )


def _smaller_models(spec: ModelSpec, smallest: ModelFacts, have: int) -> list[str]:
    """Smaller models of the family whose same-quant weights would fit (a rough scale-down,
    by the bytes per loaded parameter: an n-gram table, which may stay on disk, is not one)."""
    loaded = smallest.dense_params + smallest.expert_params
    if spec.params_total <= 0 or loaded <= 0:
        return []
    per_param = (smallest.weight_bytes - smallest.token_embd_bytes) / loaded
    seen: set[tuple[float, float]] = set()
    out = []
    for other in sorted(catalog.CATALOG, key=lambda s: -s.params_total):
        key = (other.params_total, other.params_active)
        if other.params_total >= spec.params_total or key in seen:
            continue
        need = other.params_total * 1e9 * per_param * 1.15 + 1 * GIB
        if need <= have:
            seen.add(key)
            out.append(f"the smaller {other.name} (about {fmt_bytes(need)} in all)")
        if len(out) == 2:
            break
    return out
