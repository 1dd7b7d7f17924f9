"""The search: for one quant, the context and placement that fit, fastest first.

Contract: pure. `fit_option(facts, budget, wishes, flags, least_ctx, score)` tries contexts
from the largest wanted down (the native context capped at `DEFAULT_CTX_CAP`, halved while it
does not fit, never below `least_ctx`) and, at each, the fastest placement that fits the
`Budget`: every routed expert on the GPU if it can; else the fewest layers' experts on the
CPU (`n_cpu_moe`, bisected), with the VRAM left over filled by single expert tensors of the
boundary layer (as llama.cpp's own fitter does); only when even that does not fit do whole
layers leave the GPU. With several devices (two or more GPUs, or workers) the placement is
`spread.place_spread`'s, weighed by `score`. What the user fixed in `Wishes` (context, KV
type, `--cpu-moe`, `--n-cpu-moe`, GPU layers) is kept and the rest fitted around it. When
every expert sits on the GPU the context grows (doubling, up to the native one) while it
still fits there. An n-gram table (Qwen3.8-Flash-Next) is placed last, unless
`--ngram-table` fixed it: the search runs with the table left in the file, then reads it
into RAM when it fits beside everything the placement put there. Last, with experts in RAM,
VRAM the placement left unused takes a bigger micro-batch (faster prefill). What a layout
costs is `costs.usage`'s answer; this module only searches.

Budgets are `planner/budget.py`'s: each device's free memory less its reserve
(`planner/targets.py`). Swap never counts: weights paged out to disk would run at disk speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.planner import spread
from qwenrun.planner.bisection import smallest
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, Usage, usage
from qwenrun.planner.facts import ModelFacts, pad_ctx
from qwenrun.planner.spread import Score
from qwenrun.planner.wishes import Wishes, cpu_moe_order, fixed_cpu_moe

DEFAULT_CTX_CAP = 32768
PREFERRED_MIN_CTX = 16384
MIN_CTX = 4096
N_UBATCH = LoadConfig().n_ubatch


@dataclass(frozen=True)
class Fit:
    layout: Layout
    use: Usage
    ctx_reason: str


def _ctx_candidates(facts: ModelFacts, wishes: Wishes, least: int) -> list[int]:
    """Contexts to try, largest first: the capped native one, halving down to `least`."""
    if wishes.n_ctx is not None:
        return [wishes.n_ctx]
    native = facts.ctx_native or DEFAULT_CTX_CAP
    target = min(native, DEFAULT_CTX_CAP)
    floor = min(native, least)
    out = [target]
    c = target
    while c // 2 >= floor:
        c //= 2
        out.append(c)
    if out[-1] != floor:
        out.append(floor)
    return out


def _fits(facts: ModelFacts, layout: Layout, budget: Budget, flags: frozenset[str]) -> Usage | None:
    use = usage(facts, layout, flags)
    return use if budget.fits(use) else None


def _place(
    facts: ModelFacts, base: Layout, budget: Budget, wishes: Wishes, flags: frozenset[str]
) -> tuple[Layout, Usage] | None:
    """The fastest layout at this context: most experts on the GPU, then whole layers.

    GPU use falls as experts (or whole layers) leave it, so both searches are bisections.
    """
    if not base.use_gpu:
        use = _fits(facts, base, budget, flags)
        return (base, use) if use else None
    ngl = wishes.n_gpu_layers
    first = replace(base, n_gpu_layers=-1 if ngl is None else ngl)
    found = _place_experts(facts, first, budget, wishes, flags)
    if found is not None or ngl is not None:
        return found
    # Even with every routed expert on the CPU the GPU is too small: whole layers leave it,
    # the first ones first (llama.cpp keeps the last n_gpu_layers - 1 blocks and the output).
    fixed = fixed_cpu_moe(facts, wishes)
    n_cpu_moe = facts.n_layer if fixed is None else fixed
    trunk = replace(base, n_cpu_moe=n_cpu_moe)
    top = facts.n_layer_all

    def gpu_fits(k: int) -> bool:  # k = n_gpu_layers: the output layer and k - 1 blocks
        return usage(facts, replace(trunk, n_gpu_layers=k), flags).gpu.used <= budget.gpu

    dropped = smallest(0, top - 1, lambda j: gpu_fits(top - j))
    if dropped is None:
        # Not even the output layer fits: the GPU cannot help this model.
        cpu_only = replace(base, use_gpu=False, n_gpu_layers=0, n_cpu_moe=0)
        use = _fits(facts, cpu_only, budget, flags)
        return (cpu_only, use) if use else None
    layout = replace(trunk, n_gpu_layers=top - dropped)
    use = _fits(facts, layout, budget, flags)
    return (layout, use) if use else None


def _place_experts(
    facts: ModelFacts, base: Layout, budget: Budget, wishes: Wishes, flags: frozenset[str]
) -> tuple[Layout, Usage] | None:
    wanted = fixed_cpu_moe(facts, wishes)
    if wanted is not None or not facts.is_moe:
        fixed = replace(base, n_cpu_moe=min(wanted or 0, facts.n_layer))
        fixed_use = _fits(facts, fixed, budget, flags)
        return (fixed, fixed_use) if fixed_use else None

    def gpu_fits(n: int) -> bool:
        return usage(facts, replace(base, n_cpu_moe=n), flags).gpu.used <= budget.gpu

    n = smallest(0, facts.n_layer, gpu_fits)
    if n is None:
        return None
    layout = replace(base, n_cpu_moe=n)
    use = _fits(facts, layout, budget, flags)
    if use is None:
        return None  # RAM is the limit: more experts on the CPU only makes it worse
    if n > 0:
        return _fill_boundary(facts, layout, use, budget, flags)
    return layout, use


def _fill_boundary(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """Move single expert tensors of the CPU run's innermost layer back to the GPU while they
    fit: that layer becomes the boundary of a run one layer shorter."""
    shorter = replace(layout, n_cpu_moe=layout.n_cpu_moe - 1)
    layer = shorter.boundary_layer(facts.n_layer)
    tensors = sorted(facts.expert_tensors[layer], key=lambda t: -t.n_bytes)
    on_cpu = [t.name for t in tensors]
    best = (layout, use)
    for t in tensors:
        trial = [name for name in on_cpu if name != t.name]
        candidate = replace(shorter, cpu_tensors=tuple(trial))
        found = _fits(facts, candidate, budget, flags)
        if found is not None:
            on_cpu = trial
            best = (candidate, found)
    return best


def fit_option(
    facts: ModelFacts,
    budget: Budget,
    wishes: Wishes,
    flags: frozenset[str],
    least_ctx: int = MIN_CTX,
    score: Score | None = None,
) -> Fit | None:
    """The largest context (down to `least_ctx`) with the fastest placement that fits.

    With several devices (`budget.spread`) the placement is `spread.place_spread`'s, which
    weighs its options by `score` (predicted decode tok/s)."""
    kv = (wishes.kv_type or "f16").lower()
    if budget.spread:
        spread.refuse_fixed(wishes)
    use_gpu = budget.spread or (budget.has_gpu and wishes.n_gpu_layers != 0)
    candidates = _ctx_candidates(facts, wishes, least_ctx)
    # An n-gram table's free choice is made once the rest is placed (_place_table).
    table = wishes.ngram_table or ("disk" if facts.has_table else "ram")
    for i, ctx in enumerate(candidates):
        if cannot_fit(facts, ctx, kv, budget, table == "ram"):
            continue
        base = Layout(
            n_ctx=pad_ctx(ctx),
            kv_type=kv,
            use_gpu=use_gpu,
            n_ubatch=N_UBATCH,
            cpu_moe_from=cpu_moe_order(wishes),
            ngram_table=table,
        )
        if not use_gpu:
            base = replace(base, n_gpu_layers=0)
        if budget.spread:
            found = spread.place_spread(
                facts, base, budget, wishes, flags, score or (lambda _lay, _use: 0.0)
            )
        else:
            found = _place(facts, base, budget, wishes, flags)
        if found is None:
            continue
        layout, use = found
        if wishes.n_ctx is not None:
            why = "as asked"
        elif i == 0:
            layout, use = _grow_ctx(facts, layout, use, budget, flags)
            why = ctx_default_reason(facts, layout.n_ctx)
        else:
            why = f"the largest that fits (tried {candidates[0]:,} first)"
        if wishes.ngram_table is None:
            layout, use = _place_table(facts, layout, use, budget, flags)
        layout, use = _grow_ubatch(facts, layout, use, budget, flags)
        return Fit(layout, use, why)
    return None


def cannot_fit(
    facts: ModelFacts, ctx: int, kv: str, budget: Budget, table_in_ram: bool = False
) -> bool:
    """A quick lower bound: weights and caches alone (and an n-gram table kept in RAM)
    exceed every device's memory together."""
    need = facts.weight_bytes + facts.kv_bytes(ctx, kv) + facts.rs_bytes
    return need + (facts.table_bytes if table_in_ram else 0) > budget.total


def _place_table(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """An n-gram table into RAM when it fits beside everything else the placement put there:
    a token's rows then come from memory, not from the disk. Else it stays in the file."""
    if not facts.has_table:
        return layout, use
    resident = replace(layout, ngram_table="ram")
    found = _fits(facts, resident, budget, flags)
    return (resident, found) if found is not None else (layout, use)


def ctx_default_reason(facts: ModelFacts, n_ctx: int) -> str:
    native = facts.ctx_native
    if native and n_ctx >= native:
        return "the model's native context"
    if n_ctx > DEFAULT_CTX_CAP:
        return f"grown past {DEFAULT_CTX_CAP:,} because the whole model fits on the GPU"
    suffix = f" of the model's native {native:,}" if native else ""
    return f"qwenrun's default cap{suffix}; --ctx asks for more"


# Micro-batch sizes worth trying when experts sit in RAM, biggest first (what llama.cpp users
# set with -ub/-b for MoE offload).
UBATCH_STEPS = (4096, 2048, 1024)


def _grow_ubatch(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """With experts in RAM, a bigger micro-batch in the VRAM left over after the placement.

    For batches of 32+ tokens ggml copies the host-held experts a batch uses to the GPU once
    per micro-batch, so prefill grows with `n_ubatch`; the cost is a bigger compute buffer.
    Only VRAM the placement left unused is spent: the placement (decode speed) never changes.
    """
    host_experts = layout.n_cpu_moe > 0 or bool(layout.cpu_tensors)
    if not (layout.use_gpu and facts.is_moe and host_experts):
        return layout, use
    for ub in UBATCH_STEPS:
        if ub <= layout.n_ubatch:
            break
        bigger = replace(layout, n_ubatch=ub, n_batch=max(layout.n_batch, ub))
        found = _fits(facts, bigger, budget, flags)
        if found is not None:
            return bigger, found
    return layout, use


def _grow_ctx(
    facts: ModelFacts, layout: Layout, use: Usage, budget: Budget, flags: frozenset[str]
) -> tuple[Layout, Usage]:
    """With every expert on the GPU, double the context while everything still fits there."""
    if layout.spread is not None:
        all_on_gpu = layout.spread.cpu_layers == 0 and all(
            st.host_layers == 0
            and not st.host_tensors
            and not layout.spread.targets[st.target].is_ram
            for st in layout.spread.stages
        )
    else:
        all_on_gpu = (
            layout.use_gpu
            and layout.n_cpu_moe == 0
            and not layout.cpu_tensors
            and layout.n_gpu_layers < 0
        )
    native = facts.ctx_native
    while all_on_gpu and native and layout.n_ctx < native:
        bigger = replace(layout, n_ctx=min(native, layout.n_ctx * 2))
        found = _fits(facts, bigger, budget, flags)
        if found is None:
            break
        layout, use = bigger, found
    return layout, use
