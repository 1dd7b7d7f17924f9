"""From a model reference and the user's flags to a loaded engine: shared by `run` and `chat`.

Contract: resolves the reference to local GGUF files (pulling a missing model after the
caller's confirmation), plans the load with the planner, where the user's flags are
constraints the plan is fitted around, loads the engine, and retries once with every
routed expert on the CPU when a GPU load runs out of memory. It reads the machine only
through `hwprobe`, models only through `gguf_info`/`offload`/`backend`, the hub only through
`download`. It prints nothing: what it decided comes back as reasons and notices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwenrun import errors
from qwenrun.placement import KV_TYPES, LoadConfig, Placement

if TYPE_CHECKING:
    from qwenrun.backend import Engine
    from qwenrun.download import QuantFiles, RepoListing
    from qwenrun.hwprobe import HardwareProfile
    from qwenrun.refs import ModelRef

# `--cpu-moe` as a planner constraint: more layers than any model has (the planner clamps).
_ALL_LAYERS = 1 << 20


@dataclass(frozen=True)
class RunOptions:
    """The placement, context and engine flags `run` and `chat` share."""

    ctx: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    kv_type: str | None = None
    verbose: bool = False

    @property
    def placement_given(self) -> bool:
        return self.cpu_moe or self.n_cpu_moe is not None or self.gpu_layers is not None

    def validate(self) -> None:
        if self.ctx is not None and self.ctx < 256:
            raise errors.UsageError(f"--ctx {self.ctx} is too small", hint="use at least 256")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise errors.UsageError("--n-cpu-moe must be 0 or more")
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise errors.UsageError(
                "--cpu-moe and --n-cpu-moe both set",
                hint="--cpu-moe puts every layer's experts on the CPU; pick one",
            )
        if self.gpu_layers is not None and self.gpu_layers < -1:
            raise errors.UsageError("--gpu-layers must be -1 (all) or more")
        if self.threads is not None and self.threads < 1:
            raise errors.UsageError("--threads must be 1 or more")
        if self.kv_type is not None and self.kv_type.lower() not in KV_TYPES:
            raise errors.UsageError(
                f"unknown KV cache type {self.kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}"
            )


@dataclass(frozen=True)
class Decision:
    """The load configuration chosen, and why, in words."""

    load: LoadConfig
    reasons: tuple[str, ...]


def flag_placement(opts: RunOptions) -> Placement:
    """The user's own placement, as llama.cpp's flags of the same names would give it."""
    gpu_layers = -1 if opts.gpu_layers is None else opts.gpu_layers
    if opts.cpu_moe:
        return Placement(n_gpu_layers=gpu_layers, cpu_moe_all=True)
    if opts.n_cpu_moe:
        return Placement.n_cpu_moe(opts.n_cpu_moe, n_gpu_layers=gpu_layers)
    return Placement(n_gpu_layers=gpu_layers)


def decide(path: Path, opts: RunOptions, hw: HardwareProfile) -> Decision:
    """Plan the load from the file's real tensor sizes; the user's flags are constraints."""
    from qwenrun import offload

    opts.validate()
    wishes = offload.Wishes(
        n_ctx=opts.ctx,
        kv_type=opts.kv_type,
        n_cpu_moe=_ALL_LAYERS if opts.cpu_moe else opts.n_cpu_moe,
        n_gpu_layers=opts.gpu_layers,
    )
    plan = offload.plan_for_file(path, hw, wishes)
    load = plan.load
    reasons = list(plan.reasons)
    if opts.placement_given:
        # The flags say exactly which tensors go where, as they would to llama.cpp; the plan
        # has fitted the context and KV cache around them.
        load = replace(load, placement=flag_placement(opts))
        reasons.append(f"placement from your flags: {load.placement.describe()}")
    if opts.threads:
        load = replace(load, n_threads=opts.threads)
    return Decision(load, tuple(reasons))


def resolve_model(
    model: str,
    *,
    ask: bool,
    on_notice: Callable[[str], None] | None = None,
    hw: HardwareProfile | None = None,
) -> Path:
    """Any model reference → the local path of its (first) GGUF file, pulling if needed.

    `hw` is the machine the quant to pull is chosen for (probed when needed if None).
    """
    from qwenrun import download, refs

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        assert ref.path is not None
        return ref.path

    from qwenrun import ui

    with ui.pull_progress() as on_progress:
        paths = download.resolve_local(
            ref,
            pull_if_missing=True,
            confirm=lambda target: ui.confirm_pull(target, ask=ask),
            on_progress=on_progress,
            on_notice=on_notice,
            choose=planner_chooser(hw),
        )
    return paths[0]


def planner_chooser(
    hw: HardwareProfile | None = None,
) -> Callable[[ModelRef, RepoListing], QuantFiles]:
    """Pick the quant to download: the planner's best among what the repo holds.

    A catalog model is planned from its shapes and each quant's type recipe (an estimate,
    before any byte is downloaded); a repo outside the catalog falls back to a 4-bit default.
    """

    def choose(ref: ModelRef, listing: RepoListing) -> QuantFiles:
        from qwenrun import download, gguf_info, hwprobe, offload

        if ref.spec is None:
            return download.choose_quant(ref, listing)
        options = []
        for q in listing.quants:
            try:
                info = gguf_info.estimate(ref.spec, q.quant)
            except errors.UsageError:
                continue  # a quant without a size recipe cannot be planned
            options.append(offload.QuantOption(q.quant, info, q.paths, q.total_size))
        if not options:
            return download.choose_quant(ref, listing)
        machine = hw or hwprobe.probe(check_backend=True)
        plan = offload.plan(options, machine, offload.Wishes(), ref.spec)
        chosen = listing.find(plan.quant)
        assert chosen is not None
        return chosen

    return choose


def open_engine(
    path: Path,
    opts: RunOptions,
    *,
    on_progress: Callable[[float], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    hw: HardwareProfile | None = None,
) -> tuple[Engine, Decision]:
    """Plan and load the model; on a GPU out-of-memory, retry once with experts on the CPU.

    `hw` is this machine as already probed (with the backend checked); None probes it.
    """
    from qwenrun import doctor, hwprobe
    from qwenrun.backend import Engine

    hw = hw or hwprobe.probe(check_backend=True)
    warning = doctor.cuda_warning(hw, hw.gpu_offload)
    if warning and on_notice:
        on_notice(warning)
    decision = decide(path, opts, hw)
    try:
        engine = Engine.load(path, decision.load, verbose=opts.verbose, on_progress=on_progress)
    except errors.OutOfMemoryError as err:
        retry = _more_experts_on_cpu(decision.load)
        if retry is None:
            raise
        note = f"{err.message}; retrying with {retry.placement.describe()}"
        if on_notice:
            on_notice(note)
        decision = Decision(retry, (*decision.reasons, note))
        engine = Engine.load(path, retry, verbose=opts.verbose, on_progress=on_progress)
    return engine, decision


def _more_experts_on_cpu(load: LoadConfig) -> LoadConfig | None:
    """The same config with every routed expert on the CPU, or None if it already was."""
    if load.placement.cpu_moe_all or load.placement.n_gpu_layers == 0:
        return None
    placement = replace(load.placement, cpu_moe_all=True, expert_cpu_tensors=())
    return replace(load, placement=placement)


# A default model must be pleasant to chat with: this fast at least, and no lower than a
# 3-bit quant (below that, answers degrade faster than a smaller model's would).
_MIN_DEFAULT_TOK_S = 5.0
_MIN_DEFAULT_QUANT = "Q3_K_M"


def default_model(hw: HardwareProfile) -> tuple[str, str, tuple[str, ...]]:
    """The catalog model and quant `qwenrun chat` uses when none is named, and why.

    Among hybrid models (they both think and answer directly) whose best plan runs at a
    usable speed with a quant of 3 bits or more: the most parameters, then the better quant,
    then the newest. Returns (reference, quant, reasons).
    """
    from qwenrun import catalog, offload

    floor = catalog.quant_rank(_MIN_DEFAULT_QUANT)
    best: tuple[tuple[float, int, int], catalog.ModelSpec, offload.Plan] | None = None
    for order, spec in enumerate(catalog.CATALOG):
        if spec.thinking != "hybrid":
            continue
        try:
            plan = offload.plan_for_spec(spec, hw)
        except errors.DoesNotFitError:
            continue
        rank = catalog.quant_rank(plan.quant)
        if plan.decode_tok_s < _MIN_DEFAULT_TOK_S or rank > floor:
            continue
        key = (spec.params_total, -rank, order)
        if best is None or key > best[0]:
            best = (key, spec, plan)
    if best is None:
        raise errors.DoesNotFitError(
            "no Qwen MoE model runs usably on this machine "
            f"(at least {_MIN_DEFAULT_TOK_S:g} tok/s with a 3-bit or better quant)",
            hint="`qwenrun probe` lists each model with what it would need",
        )
    _, spec, plan = best
    why = (
        f"{spec.display} at {plan.quant}: the largest hybrid (thinking and direct) Qwen MoE "
        f"that fits this machine at ≈{plan.decode_tok_s:.0f} tok/s",
    )
    return spec.name, plan.quant, why
