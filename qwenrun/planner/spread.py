"""The search over several devices: each machine a contiguous run of layers, its GPUs sharing
that run, and the routed experts that do not fit its GPUs in its own RAM.

Contract: pure. `place_spread(facts, base, budget, wishes, flags, score)` returns the fastest
`Spread` layout that fits every device of the `Budget` at the context of `base` (with its
`Usage`), or None. Used when several devices take layers: two or more GPUs here, or workers
(`qwenrun worker`, llama.cpp's RPC backend). What it does, and why:

- Machines come in llama.cpp's order: layers this machine keeps on its CPU come first (a
  machine without a GPU keeps its whole run there), then each worker's run, then this
  machine's GPUs, last, so that the output layer and its logits stay here. One machine's
  layers are one contiguous run: a run costs one network hand-off per token at each end,
  while experts of a layer on another machine would cost two per layer.
- How many layers each machine runs: its GPUs are filled first (their memory is the fast
  one), and what is left goes in proportion to each machine's RAM; or, in proportion to
  every device's memory; or this machine alone when it holds the model. Each option is
  placed, and the fastest by the speed model that fits is taken (`score`). A run a machine
  cannot hold is cut, and the layers it could not take go to the next machine.
- Within a machine, its GPUs share its run in proportion to their free memory, each its own
  contiguous part, and each keeps as many of its layers' routed experts as fit (the last
  layers of its part hand their experts to the machine's RAM first, then single expert
  tensors of the layer before them come back while they fit, as for one GPU). When even the
  dense part of the run does not fit its GPUs, its first layers go wholly to its RAM.
- What the user fixed: `--cpu-moe` puts every routed expert in its machine's RAM. Settings
  that name one GPU's layers (`--n-cpu-moe`, `--cpu-moe-from`, `--gpu-layers`) are refused
  with several devices (the one-line error says so); the context and KV type are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from qwenrun import errors
from qwenrun.planner.bisection import smallest
from qwenrun.planner.budget import Budget
from qwenrun.planner.costs import Layout, Spread, Stage, Usage, spread_usage
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.targets import Target
from qwenrun.planner.wishes import Wishes

Score = Callable[[Layout, Usage], float]  # predicted decode tok/s: higher is better


@dataclass(frozen=True)
class Machine:
    """One machine's devices, as indices into the budget's targets."""

    key: str  # "" for this machine, else the worker's endpoint
    gpus: tuple[int, ...]
    ram: int


def machines(targets: Sequence[Target]) -> list[Machine]:
    """The machines in the order their runs come (see the module docstring)."""
    keys = list(dict.fromkeys(t.machine for t in targets))
    out = []
    for key in keys:
        idx = [i for i, t in enumerate(targets) if t.machine == key]
        gpus = tuple(i for i in idx if not targets[i].is_ram)
        ram = next(i for i in idx if targets[i].is_ram)
        out.append(Machine(key, gpus, ram))
    local = next(m for m in out if m.key == "")
    workers = [m for m in out if m.key != ""]
    return [*workers, local] if local.gpus else [local, *workers]


def refuse_fixed(wishes: Wishes) -> None:
    """Settings that place one GPU's layers have no meaning over several devices."""
    named = [
        flag
        for flag, given in (
            ("--n-cpu-moe", wishes.n_cpu_moe is not None),
            ("--cpu-moe-from", wishes.cpu_moe_from is not None),
            ("--gpu-layers", wishes.n_gpu_layers is not None),
        )
        if given
    ]
    if named:
        raise errors.UsageError(
            f"{', '.join(named)} place layers for one GPU; with several GPUs or workers the "
            "planner places each device's layers and experts itself",
            hint="leave them out (--cpu-moe still puts every routed expert in RAM)",
        )


def _layer_bytes(facts: ModelFacts, base: Layout) -> list[int]:
    kv = facts.kv_bytes_per_layer(base.n_ctx, base.kv_type)
    attn = set(facts.attn_layers)
    return [
        facts.dense_bytes[i]
        + facts.expert_bytes[i]
        + (kv if i in attn else 0)
        + facts.rs_bytes_of(range(i, i + 1))
        for i in range(facts.n_layer)
    ]


def _counts_for(weights: Sequence[float], layer_bytes: Sequence[int]) -> list[int]:
    """Consecutive runs of layers whose bytes are in proportion to `weights`."""
    total_w = sum(weights)
    if total_w <= 0:
        return [0] * (len(weights) - 1) + [len(layer_bytes)]
    total_b = sum(layer_bytes)
    counts, start, acc = [], 0, 0.0
    for k, w in enumerate(weights):
        if k == len(weights) - 1:
            counts.append(len(layer_bytes) - start)
            break
        acc += w / total_w * total_b
        end, run = start, sum(layer_bytes[:start])
        while end < len(layer_bytes) and run + layer_bytes[end] / 2 <= acc:
            run += layer_bytes[end]
            end += 1
        counts.append(end - start)
        start = end
    return counts


def _share_options(
    facts: ModelFacts, base: Layout, targets: Sequence[Target], ms: Sequence[Machine]
) -> list[list[int]]:
    """Candidate layer counts per machine (see the module docstring)."""
    lb = _layer_bytes(facts, base)
    total = sum(lb)
    gpu = [sum(targets[i].budget for i in m.gpus) for m in ms]
    ram = [targets[m.ram].budget for m in ms]
    options = []
    # The GPUs first, the rest in proportion to RAM.
    if sum(gpu) >= total:
        options.append(_counts_for(gpu, lb))
    else:
        rest = total - sum(gpu)
        weights = [g + rest * r / max(1, sum(ram)) for g, r in zip(gpu, ram, strict=True)]
        options.append(_counts_for(weights, lb))
    # Every device in proportion to its memory.
    options.append(_counts_for([g + r for g, r in zip(gpu, ram, strict=True)], lb))
    # This machine alone, when it has the memory for it.
    local = next(k for k, m in enumerate(ms) if m.key == "")
    if gpu[local] + ram[local] >= total:
        alone = [0] * len(ms)
        alone[local] = facts.n_layer
        options.append(alone)
    unique: list[list[int]] = []
    for o in options:
        if o not in unique:
            unique.append(o)
    return unique


def place_spread(
    facts: ModelFacts,
    base: Layout,
    budget: Budget,
    wishes: Wishes,
    flags: frozenset[str],
    score: Score,
) -> tuple[Layout, Usage] | None:
    """The fastest spread that fits at `base`'s context (see the module docstring)."""
    targets = budget.targets
    ms = machines(targets)
    best: tuple[float, Layout, Usage] | None = None
    for counts in _share_options(facts, base, targets, ms):
        found = _place_runs(facts, base, budget, ms, counts, wishes.cpu_moe, flags)
        if found is None:
            continue
        layout, use = found
        speed = score(layout, use)
        if best is None or speed > best[0]:
            best = (speed, layout, use)
    return None if best is None else (best[1], best[2])


class _Placer:
    """Builds a spread machine by machine, checking each device against its budget."""

    def __init__(
        self,
        facts: ModelFacts,
        base: Layout,
        budget: Budget,
        all_on_host: bool,
        flags: frozenset[str],
    ) -> None:
        self.facts, self.base, self.budget = facts, base, budget
        self.all_on_host, self.flags = all_on_host, flags
        self.cpu_layers = 0
        self.stages: list[Stage] = []
        # While a machine before the last is checked, the output layer is not placed yet.
        self.with_output = True

    def copy(self) -> _Placer:
        other = _Placer(self.facts, self.base, self.budget, self.all_on_host, self.flags)
        other.cpu_layers, other.stages = self.cpu_layers, list(self.stages)
        return other

    def layout(
        self, stages: Sequence[Stage], cpu_layers: int | None = None, output: bool | None = None
    ) -> Layout:
        spread = Spread(
            self.budget.targets,
            self.cpu_layers if cpu_layers is None else cpu_layers,
            tuple(stages),
            with_output=self.with_output if output is None else output,
        )
        return replace(self.base, spread=spread, use_gpu=True)

    def usage(
        self, stages: Sequence[Stage], cpu_layers: int | None = None, output: bool | None = None
    ) -> Usage:
        return spread_usage(self.facts, self.layout(stages, cpu_layers, output), self.flags)

    def fits(self, use: Usage, indices: Sequence[int]) -> bool:
        targets = self.budget.targets
        return all(use.devices[i].used <= targets[i].budget for i in indices)

    def place(self, m: Machine, count: int, last: bool) -> bool:
        """Give machine `m` the next `count` layers; False when it cannot hold them."""
        self.with_output = last
        if count == 0:
            return True
        mine = [*m.gpus, m.ram]
        is_local = m.key == ""
        if not m.gpus:
            if is_local:
                if self.stages:
                    return False  # this machine's CPU layers can only come first
                cpu = self.cpu_layers + count
                ok = self.fits(self.usage(self.stages, cpu), mine)
                if ok:
                    self.cpu_layers = cpu
                return ok
            ram_run = [*self.stages, Stage(m.ram, count)]
            if self.fits(self.usage(ram_run), mine):
                self.stages = ram_run
                return True
            return False
        # Whole layers go to the machine's RAM only while its GPUs cannot take the run's
        # dense part: the fewest such layers (GPU bytes fall as layers leave: a bisection).
        ram_layers = smallest(0, count, lambda r: self._gpu_stages(m, count - r, last) is not None)
        if ram_layers is None:
            return False
        placed = self._gpu_stages(m, count - ram_layers, last)
        assert placed is not None
        stages = placed
        prefix: list[Stage] = []
        cpu = self.cpu_layers
        if ram_layers:
            if is_local:
                if self.stages:
                    return False  # this machine's CPU layers can only come first
                cpu += ram_layers
            else:
                prefix = [Stage(m.ram, ram_layers)]
        full = [*self.stages, *prefix, *stages]
        if not self.fits(self.usage(full, cpu), mine):
            return False  # the RAM is the limit: more layers there only makes it worse
        self.stages, self.cpu_layers = full, cpu
        return True

    def _gpu_stages(self, m: Machine, count: int, last: bool) -> list[Stage] | None:
        """The machine's GPUs sharing `count` layers, each with the fewest layers' experts
        on the host that lets it fit; None when a GPU cannot hold its dense part."""
        if count == 0:
            return []
        targets = self.budget.targets
        shares = [float(targets[i].budget) for i in m.gpus]
        parts = _split(count, shares)
        stages: list[Stage] = []
        for j, (gi, n) in enumerate(zip(m.gpus, parts, strict=True)):
            if n == 0:
                continue
            is_last = last and j == len(m.gpus) - 1
            chosen = self._fit_gpu(gi, m.ram, n, stages, is_last)
            if chosen is None:
                return None
            stages.append(chosen)
        return stages

    def _fit_gpu(self, gi: int, host: int, n: int, before: list[Stage], last: bool) -> Stage | None:
        def stage(h: int, tensors: tuple[str, ...] = ()) -> Stage:
            return Stage(gi, n, host, h, tensors)

        def gpu_ok(h: int) -> bool:
            use = self.usage([*self.stages, *before, stage(h)], output=last)
            return use.devices[gi].used <= self.budget.targets[gi].budget

        if self.all_on_host or not self.facts.is_moe:
            h = n if self.facts.is_moe else 0
            return stage(h) if gpu_ok(h) else None
        least = smallest(0, n, gpu_ok)
        if least is None:
            return None
        h = least
        if h == 0:
            return stage(0)
        # Single tensors of the layer before the host run come back while they fit.
        start = self.cpu_layers + sum(s.count for s in [*self.stages, *before])
        layer = start + n - h
        tensors = sorted(self.facts.expert_tensors[layer], key=lambda t: -t.n_bytes)
        on_host = [t.name for t in tensors]
        best = stage(h)
        for t in tensors:
            trial = tuple(x for x in on_host if x != t.name)
            candidate = stage(h - 1, trial)
            use = self.usage([*self.stages, *before, candidate], output=last)
            if use.devices[gi].used <= self.budget.targets[gi].budget:
                on_host = list(trial)
                best = candidate
        return best


def _place_runs(
    facts: ModelFacts,
    base: Layout,
    budget: Budget,
    ms: Sequence[Machine],
    counts: Sequence[int],
    all_on_host: bool,
    flags: frozenset[str],
) -> tuple[Layout, Usage] | None:
    """Place the machines' runs in order; a run a machine cannot hold is cut to what it can,
    and the rest goes to the next machine."""
    placer = _Placer(facts, base, budget, all_on_host, flags)
    carry = 0
    for k, m in enumerate(ms):
        want = counts[k] + carry
        last = k == len(ms) - 1
        if last:
            if not placer.place(m, want, True):
                return None
            carry = 0
            break
        # The most of `want` this machine holds (placement only gets harder with more).
        best, lo, hi = 0, 0, want
        while lo <= hi:
            mid = (lo + hi) // 2
            if placer.copy().place(m, mid, False):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        placer.place(m, best, False)
        carry = want - best
    if carry:
        return None
    placer.with_output = True
    layout = placer.layout(placer.stages)
    assert layout.spread is not None
    if layout.spread.cpu_layers + sum(s.count for s in layout.spread.stages) != facts.n_layer:
        return None
    if not layout.spread.stages:
        return None  # all on this machine's CPU: not a spread (the one-device search does it)
    use = spread_usage(facts, layout, flags)
    return (layout, use) if budget.fits(use) else None


def _split(count: int, shares: Sequence[float]) -> list[int]:
    """`count` in whole parts in proportion to `shares` (largest remainders)."""
    total = sum(shares)
    if total <= 0:
        return [0] * (len(shares) - 1) + [count]
    raw = [count * s / total for s in shares]
    parts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: -(raw[i] - parts[i]))[: count - sum(parts)]:
        parts[i] += 1
    return parts
