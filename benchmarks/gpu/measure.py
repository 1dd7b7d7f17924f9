"""The GPU kit's measurements: qwenrun's placements against llama.cpp's, repeated and alternated.

Contract: for each card size (`--caps`, 16/12/8 GiB by default; `--gpu-mem` for the planner,
`llama-fit-params` with a margin that leaves it the same usable bytes) it plans the model once
and lists the placements to measure, each with the planner's predicted bytes per buffer and
predicted decode/prefill tok/s (`planner/speed.py` at the bench's context, calibrated on the
H200 data):

    auto@C     qwenrun's plan as it is (last-N layers' experts on the CPU)
    first@C    the same with `--cpu-moe-from first`
    fit@C      llama.cpp's `--fit` (`llama-fit-params`), its `-ot` list loaded as is
    ncmoeN@C   llama.cpp's `--n-cpu-moe N` (first N), N = the plan's CPU-expert layers ± 0..3
    layersL@C  plain layer offload: the planner's whole-layer plan (L GPU layers), and L + 1
    auto-tT@C  the plan with T threads (physical cores − 1 for the CUDA driver's thread, …)
    full       every layer on the GPU (once, not per card)

Identical placements are measured once under all their names. The work is grouped into
blocks, most important first (`--blocks`): `core@C` (auto, fit, layers, ncmoe at the plan's
count) per card, then `extra` (first-N, threads, full), then `sweep@C` (ncmoe ±1..±3, layers
+ 1). Within a block every placement runs `--rounds` times in alternating order
(`qwenrun.bench.runner.schedule`: ABC, CBA, ABC) through `runner.measure_once`, in
worker.py (one process, restarted if it dies), exactly as `qwenrun bench` measures. An ncmoe or
layers placement whose footprint exceeds every card it stands for is not repeated. Each run is
appended to OUT/results.jsonl at once and OUT/summary.md is rewritten (summary.py); no run
starts that would end after `--deadline`. Runs already in results.jsonl are not redone, so a
second call on a still-warm machine continues.

`--dry-run` runs everything but CUDA on a CPU machine: caps scaled to the (small) model, a
short prompt, no `full`, feasibility from the planner's budget (no NVML); the fit parser is
also checked on the H200 run's fit.log, and `--bin benchmarks/gpu/dry-fit` stands in for
llama-fit-params (device.sh DRY=1 does all this).

    python benchmarks/gpu/measure.py MODEL --out DIR [--mirror DIR] [--deadline EPOCH]
        [--bin DIR] [--caps 16,12,8] [--rounds 3] [--blocks core@16,...] [--dry-run]
    python benchmarks/gpu/measure.py --summarize DIR     # rewrite DIR/summary.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import summary  # noqa: E402

from qwenrun import errors, hwprobe, offload  # noqa: E402
from qwenrun.bench import runner  # noqa: E402
from qwenrun.engine.loadconfig import LoadConfig, Placement  # noqa: E402
from qwenrun.hub import header  # noqa: E402
from qwenrun.hwprobe import HardwareProfile  # noqa: E402
from qwenrun.offload import Wishes  # noqa: E402
from qwenrun.planner import speed  # noqa: E402
from qwenrun.planner.budget import Budget  # noqa: E402
from qwenrun.planner.costs import Layout, Usage, usage  # noqa: E402
from qwenrun.planner.facts import ModelFacts  # noqa: E402
from qwenrun.planner.targets import CUDA_CONTEXT_BYTES, GPU_MARGIN_BYTES  # noqa: E402
from qwenrun.units import GIB, MIB, parse_size  # noqa: E402

H200_FIT_LOG = HERE / "h200-2026-11-27" / "fit.log"
PRUNABLE = ("ncmoe", "layers")  # kinds whose runs stop once they do not fit their card
T0 = time.time()


def log(msg: str) -> None:
    print(f"[measure +{time.time() - T0:5.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# What to measure


@dataclass(frozen=True)
class Settings:
    prompt: int
    gen: int
    ctx: int
    kv: str
    rounds: int
    sweep: int
    dry: bool

    @property
    def context_tokens(self) -> int:
        """Mean context while decoding: the prompt plus half the answer."""
        return self.prompt + self.gen // 2

    def bench(self) -> runner.BenchSettings:
        return runner.BenchSettings(prompt_tokens=self.prompt, gen_tokens=self.gen, rounds=1)


@dataclass
class Config:
    """One placement to measure, under every name it stands for."""

    id: str
    names: list[list[Any]]  # [name, cap in GiB or None, kind, block]
    label: str
    load: LoadConfig
    layout: Layout
    predicted: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.names[0][0])

    def caps(self) -> list[float]:
        return [c for _, c, _, _ in self.names if c is not None]

    def prunable(self) -> bool:
        return all(kind in PRUNABLE and cap is not None for _, cap, kind, _ in self.names)

    def describe(self) -> dict[str, Any]:
        p = self.load.placement
        return {
            "config": self.id,
            "name": self.name,
            "names": self.names,
            "label": self.label,
            "threads": self.load.n_threads,
            "layout": asdict(self.layout),
            "placement": {
                "n_gpu_layers": p.n_gpu_layers,
                "cpu_moe_all": p.cpu_moe_all,
                "expert_cpu_layers": list(p.expert_cpu_layers),
                "expert_cpu_tensors": list(p.expert_cpu_tensors),
                "extra_overrides": [list(x) for x in p.extra_overrides],
                "describe": p.describe(),
            },
            "n_ctx": self.load.n_ctx,
            "n_ubatch": self.load.n_ubatch,
            "n_batch": self.load.n_batch,
            "kv_type": self.load.kv_type,
            "use_mmap": self.load.mmap_enabled(),
            "extra_bufts": self.load.extra_bufts,
            "predicted": self.predicted,
            "source": self.source,
        }


def config_id(load: LoadConfig) -> str:
    return hashlib.sha256(repr(load).encode()).hexdigest()[:12]


class Registry:
    """The placements by what they load: a second name for the same `LoadConfig` is an alias."""

    def __init__(self) -> None:
        self.configs: dict[str, Config] = {}
        self.blocks: dict[str, list[str]] = {}

    def add(
        self,
        block: str,
        name: str,
        cap: float | None,
        kind: str,
        load: LoadConfig,
        layout: Layout,
        predicted: dict[str, Any],
        source: dict[str, Any] | None = None,
    ) -> Config:
        cid = config_id(load)
        cfg = self.configs.get(cid)
        if cfg is None:
            label = f"{load.placement.describe()}, {load.n_threads} threads"
            cfg = Config(cid, [], label, load, layout, predicted, source or {})
            self.configs[cid] = cfg
        elif source:
            cfg.source = {**cfg.source, **source}
        if all(n[0] != name for n in cfg.names):
            cfg.names.append([name, cap, kind, block])
        ids = self.blocks.setdefault(block, [])
        if cid not in ids:
            ids.append(cid)
        return cfg


def cap_label(cap: float) -> str:
    return f"{cap:.2f}".rstrip("0").rstrip(".")


def predicted_buffers(use: Usage) -> dict[str, int]:
    """Bytes per `kind/device`, as `Plan.predicted_buffers` words them (GPU weights, KV …)."""
    out: dict[str, int] = {}
    for dev, name in ((use.gpu, "GPU"), (use.cpu, "CPU")):
        for kind, n in (
            ("model", dev.weights),
            ("kv", dev.kv),
            ("rs", dev.rs),
            ("compute", dev.compute),
            ("output", dev.output),
        ):
            if n:
                out[f"{kind}/{name}"] = n
    return out


def prediction(
    facts: ModelFacts, layout: Layout, hw: HardwareProfile, threads: int, s: Settings
) -> dict[str, Any]:
    """The planner's bytes and speed for one placement on the capped machine `hw`."""
    use = usage(facts, layout)
    params = speed.params_for(hw)
    work = speed.work_of(facts, layout)
    machine = speed.machine_of(hw, layout.use_gpu, threads)
    synthetic = replace(params, prefill_expert_coverage=speed.H200_SYNTHETIC_COVERAGE)
    return {
        "buffers": predicted_buffers(use),
        "gpu_used": use.gpu.used,
        "cpu_used": use.cpu.used,
        "fits_budget": Budget.from_hw(hw).fits(use),
        "context_tokens": s.context_tokens,
        "decode_tok_s": round(speed.predict_decode(work, machine, s.context_tokens, params), 2),
        "prefill_tok_s": round(
            speed.predict_prefill(work, machine, s.prompt, layout.n_ubatch, params), 1
        ),
        # The synthetic model's random router touches ~38 % of a CPU block's experts per
        # 512-token batch (real text: nearly all): the calibration's prefill figure for it.
        "prefill_tok_s_synthetic": round(
            speed.predict_prefill(work, machine, s.prompt, layout.n_ubatch, synthetic), 1
        ),
    }


# --------------------------------------------------------------------------------------
# llama.cpp's --fit


@dataclass(frozen=True)
class FitArgs:
    n_gpu_layers: int
    n_ctx: int | None
    overrides: tuple[tuple[str, str], ...]
    unknown: tuple[str, ...]


def parse_fit_args(line: str) -> FitArgs:
    """The arguments `llama-fit-params` prints (`-c 32768 -ngl 49 -ot "a=CPU,b=CPU"`).

    It quotes the `-ot` value for a shell; the H200 run loaded `CPU"` as a buffer name once
    (quotes kept by a plain split). shlex removes them, and any left are stripped.
    """
    try:
        toks = shlex.split(line)
    except ValueError:
        toks = line.replace('"', "").split()
    ngl, ctx, pairs, unknown = -1, None, [], []
    i = 0
    while i < len(toks):
        t = toks[i]
        val = toks[i + 1] if i + 1 < len(toks) else ""
        if t in ("-ngl", "--n-gpu-layers", "--gpu-layers"):
            ngl, i = int(val), i + 2
        elif t in ("-c", "--ctx-size"):
            ctx, i = int(val), i + 2
        elif t in ("-ot", "--override-tensor"):
            for item in val.strip("\"'").split(","):
                pattern, _, buft = item.strip().strip("\"'").rpartition("=")
                if pattern:
                    pairs.append((pattern, buft.strip("\"'")))
            i += 2
        else:
            unknown.append(t)
            i += 1
    return FitArgs(ngl, ctx, tuple(pairs), tuple(unknown))


_WHOLE = re.compile(r"^blk\\\.(\d+)\\\.ffn_\(")
_ONE = re.compile(r"^blk\\\.(\d+)\\\.ffn_(\w+?)\.\*$")


def fit_layout(args: FitArgs, n_layer: int, base: Layout) -> Layout:
    """--fit's override list in the planner's terms: a run of whole layers, the boundary
    layer's single tensors (as tests/test_speed.py reads the H200 run's)."""
    layers, tensors = [], []
    for pattern, _buft in args.overrides:
        if m := _ONE.match(pattern):
            tensors.append(f"blk.{m.group(1)}.ffn_{m.group(2)}_exps.weight")
        elif (m := _WHOLE.match(pattern)) and int(m.group(1)) < n_layer:
            layers.append(int(m.group(1)))
    lay = replace(base, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx or base.n_ctx)
    if not layers:
        return lay
    layers.sort()
    order = "last" if layers[-1] == n_layer - 1 and layers[0] != 0 else "first"
    return replace(lay, n_cpu_moe=len(layers), cpu_tensors=tuple(tensors), cpu_moe_from=order)


def check_fit_parser() -> str:
    """The parser on the H200 run's real `llama-fit-params` output (quotes and all)."""
    lines = [ln[5:] for ln in H200_FIT_LOG.read_text().splitlines() if ln.startswith("ARGS ")]
    seen = []
    for line in lines:
        a = parse_fit_args(line)
        bad = [p for p, b in a.overrides if b != "CPU" or '"' in p]
        if bad or not a.overrides or a.unknown:
            raise SystemExit(f"fit parser failed on {line[:80]}…: {bad or a.unknown}")
        lay = fit_layout(a, 48, Layout(n_ctx=a.n_ctx or 0))
        seen.append(f"{lay.cpu_moe_from} {lay.n_cpu_moe} + {len(lay.cpu_tensors)} tensor(s)")
    return f"{len(lines)} ARGS lines of {H200_FIT_LOG.parent.name}/fit.log: " + "; ".join(seen)


class Fitter:
    """`llama-fit-params` for a card of `cap` bytes: the free memory it sees minus the bytes
    qwenrun's budget may use is the margin (`-fitt`), so both plan for the same usable bytes."""

    def __init__(self, exe: Path, model: str, s: Settings, res: Path) -> None:
        self.exe, self.model, self.s, self.res = exe, model, s, res
        # A second call on a warm machine asks again only what it has not asked.
        self.cache_path = res / "fit.json"
        self.cache: dict[str, Any] = {}
        if self.cache_path.exists():
            self.cache = json.loads(self.cache_path.read_text())
        self.free_mib: int | None = self.cache.get("free_mib")
        self.verbose = True

    def _remember(self, key: str, value: Any) -> None:
        self.cache[key] = value
        self.cache_path.write_text(json.dumps(self.cache, indent=1))

    def _call(self, margin_mib: int) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.exe), "-m", self.model, "-c", str(self.s.ctx), "-fitt", str(margin_mib)]
        if self.verbose:
            # -lv 4: the trace lines, among them the free memory fit sees (after its context)
            p = subprocess.run([*cmd, "-lv", "4"], capture_output=True, text=True, timeout=180)
            if p.returncode == 0:
                return p
            self.verbose = False  # not this build's option after all: ask as the H200 run did
            log(f"llama-fit-params -lv 4 failed (rc {p.returncode}); without it from now on")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)

    def free(self) -> int:
        if self.free_mib is None:
            p = self._call(0)
            m = re.search(r"vs\. (\d+) MiB of free device memory", p.stderr + p.stdout)
            if m:
                self.free_mib, how = int(m.group(1)), "as llama-fit-params says"
            else:  # NVML's free memory less a CUDA context, as the H200 run had it
                nvml = nvml_free_mib()
                self.free_mib = int(nvml) - 512 if nvml is not None else -1
                how = "NVML's free memory - 512 MiB (llama-fit-params said nothing)"
            log(f"llama-fit-params: {self.free_mib} MiB free, {how}")
            if self.free_mib > 0:
                self._remember("free_mib", self.free_mib)
            with open(self.res / "fit.log", "a") as f:
                f.write(f"== free probe (-fitt 0): {self.free_mib} MiB, {how}\n")
                f.write(f"{p.stderr[-3000:]}\nARGS {p.stdout.strip()[-500:]}\n")
        return self.free_mib

    def args(self, cap: int, usable: int) -> tuple[FitArgs, str] | None:
        free = self.free()
        if free <= 0:
            log("llama-fit-params did not say how much memory is free: no fit configs")
            return None
        margin = free - usable // MIB
        key = f"{self.model}|ctx {self.s.ctx}|-fitt {margin}"
        if key in self.cache:
            return parse_fit_args(self.cache[key]), self.cache[key]
        p = self._call(margin)
        out = p.stdout.strip().splitlines()
        line = out[-1] if out else ""
        with open(self.res / "fit.log", "a") as f:
            f.write(
                f"== cap {cap / GIB:g} GiB: usable {usable // MIB} MiB, free {free} MiB, "
                f"-fitt {margin}, rc {p.returncode}\n{p.stderr[-4000:]}\nARGS {line}\n"
            )
        if p.returncode != 0 or "-ngl" not in line:
            log(f"llama-fit-params failed for {cap / GIB:g} GiB (rc {p.returncode}): see fit.log")
            return None
        self._remember(key, line)
        return parse_fit_args(line), line


# --------------------------------------------------------------------------------------
# Planning every block


def dry_caps(facts: ModelFacts, s: Settings) -> list[int]:
    """Cards that put about 1/4, 1/2 and 3/4 of the routed experts on the CPU."""
    full = usage(facts, Layout(n_ctx=s.ctx, kv_type=s.kv)).gpu.used
    bare = usage(
        facts, Layout(n_ctx=s.ctx, kv_type=s.kv, n_cpu_moe=facts.n_layer, cpu_moe_from="last")
    ).gpu.used
    reserve = CUDA_CONTEXT_BYTES + GPU_MARGIN_BYTES
    return [int(reserve + bare + f * (full - bare)) for f in (0.75, 0.5, 0.25)]


def plan_everything(
    model: str,
    hw: HardwareProfile,
    facts: ModelFacts,
    caps: list[int],
    s: Settings,
    fitter: Fitter | None,
    extra_bufts: bool,
) -> tuple[Registry, dict[str, Any]]:
    reg = Registry()
    info: dict[str, Any] = {"caps": {}}
    default_threads = hw.physical_cores or 1  # what a plan sets when --threads is not given
    thread_counts = sorted(
        {t for t in (hw.physical_cores - 1, hw.physical_cores, hw.logical_cores) if t >= 1}
    )
    base = Layout(n_ctx=s.ctx, kv_type=s.kv)

    def load_of(layout: Layout, threads: int) -> LoadConfig:
        return offload.load_config(
            facts, layout, Wishes(), threads=threads, extra_bufts=extra_bufts
        )

    def threaded(plan: offload.Plan, threads: int | None = None) -> LoadConfig:
        return replace(
            plan.load,
            n_threads=threads or plan.load.n_threads or default_threads,
            extra_bufts=extra_bufts and plan.load.extra_bufts,
        )

    plans: dict[int, dict[str, offload.Plan]] = {}
    for cap in caps:
        c = float(cap_label(cap / GIB))
        hwc = hwprobe.with_memory(hw, gpu_bytes=cap)
        wish = Wishes(gpu_mem_bytes=(cap,), n_ctx=s.ctx, kv_type=s.kv)
        entry: dict[str, Any] = {"cap_bytes": cap, "usable_bytes": Budget.from_hw(hwc).gpu}
        info["caps"][cap_label(c)] = entry
        got: dict[str, offload.Plan] = {}
        for key, w in (
            ("auto", wish),
            ("first", replace(wish, cpu_moe_from="first")),
            ("layers", replace(wish, n_cpu_moe=0)),
        ):
            try:
                got[key] = offload.plan_for_file(model, hw, w)
                entry[key] = got[key].to_dict()
            except errors.QwenrunError as err:
                entry[key] = {"error": err.message}
                log(f"cap {c:g} GiB: no {key} plan: {err.message}")
        plans[cap] = got
        if "auto" in got:
            p = got["auto"]
            log(
                f"cap {c:g} GiB: plan {p.load.placement.describe()}; {p.cpu_expert_layers} "
                f"CPU-expert layers; predicted {p.decode_tok_s:.1f} tok/s decode, GPU "
                f"{p.gpu.bytes.used / MIB if p.gpu else 0:.0f} MiB"
            )

    def add_plan(block: str, name: str, cap: int, kind: str, p: offload.Plan, t: int | None):
        c = float(cap_label(cap / GIB))
        hwc = hwprobe.with_memory(hw, gpu_bytes=cap)
        load = threaded(p, t)
        lay = p.layout or base
        pred = prediction(facts, lay, hwc, load.n_threads or default_threads, s)
        pred["plan_decode_tok_s"] = round(p.decode_tok_s, 2)
        pred["plan_prefill_tok_s"] = round(p.prefill_tok_s, 1)
        pred["plan_buffers"] = {f"{k}/{d}": n for (k, d), n in p.predicted_buffers().items()}
        reg.add(block, f"{name}@{cap_label(c)}", c, kind, load, lay, pred)

    def add_layout(block: str, name: str, cap: int | None, kind: str, lay: Layout, **src: Any):
        c = float(cap_label(cap / GIB)) if cap else None
        hwc = hwprobe.with_memory(hw, gpu_bytes=cap) if cap else hw
        load = load_of(lay, default_threads)
        pred = prediction(facts, lay, hwc, default_threads, s)
        full_name = f"{name}@{cap_label(c)}" if c is not None else name
        reg.add(block, full_name, c, kind, load, lay, pred, src or None)

    # core@C: the targets' own placements
    for cap in caps:
        block, got = f"core@{cap_label(cap / GIB)}", plans[cap]
        if "auto" in got:
            add_plan(block, "auto", cap, "auto", got["auto"], None)
        if fitter is not None:
            add_fit(reg, block, cap, hw, facts, s, fitter, default_threads, extra_bufts, base)
        if "layers" in got:
            lp = got["layers"]
            add_plan(block, f"layers{lp.load.placement.n_gpu_layers}", cap, "layers", lp, None)
        if "auto" in got:
            k = got["auto"].cpu_expert_layers
            lay = replace(base, n_cpu_moe=k, cpu_moe_from="first")
            add_layout(block, f"ncmoe{k}", cap, "ncmoe", lay)
    # extra: which layers, how many threads, everything on the GPU
    for cap in caps:
        got = plans[cap]
        if "first" in got:
            add_plan("extra", "first", cap, "first", got["first"], None)
    if caps and "auto" in plans[caps[0]]:
        for t in thread_counts:
            add_plan("extra", f"auto-t{t}", caps[0], "threads", plans[caps[0]]["auto"], t)
    if not s.dry:
        add_layout("extra", "full", None, "full", base)
    # sweep@C: --n-cpu-moe around the plan, one whole layer more on the GPU
    for cap in caps:
        block, got = f"sweep@{cap_label(cap / GIB)}", plans[cap]
        if "auto" in got:
            k = got["auto"].cpu_expert_layers
            for d in [x for a in range(1, s.sweep + 1) for x in (-a, a)]:
                if 0 <= k + d <= facts.n_layer:
                    lay = replace(base, n_cpu_moe=k + d, cpu_moe_from="first")
                    add_layout(block, f"ncmoe{k + d}", cap, "ncmoe", lay)
        if "layers" in got:
            lay = got["layers"].layout or base
            ngl = lay.n_gpu_layers + 1
            if lay.n_gpu_layers >= 0 and ngl <= facts.n_layer_all + 1:
                add_layout(block, f"layers{ngl}", cap, "layers", replace(lay, n_gpu_layers=ngl))
    return reg, info


def add_fit(
    reg: Registry,
    block: str,
    cap: int,
    hw: HardwareProfile,
    facts: ModelFacts,
    s: Settings,
    fitter: Fitter,
    threads: int,
    extra_bufts: bool,
    base: Layout,
) -> None:
    hwc = hwprobe.with_memory(hw, gpu_bytes=cap)
    got = fitter.args(cap, Budget.from_hw(hwc).gpu)
    if got is None:
        return
    args, line = got
    placement = Placement(n_gpu_layers=args.n_gpu_layers, extra_overrides=args.overrides)
    load = LoadConfig(
        placement=placement,
        n_ctx=args.n_ctx or s.ctx,
        kv_type=s.kv,
        n_threads=threads,
        extra_bufts=extra_bufts,
    )
    lay = fit_layout(args, facts.n_layer, base)
    pred = prediction(facts, lay, hwc, threads, s)
    c = float(cap_label(cap / GIB))
    run = lay.cpu_expert_layers(facts.n_layer)
    where = f"layers {run.start}-{run.stop - 1}" if len(run) else "no layers"
    extra = f" + {len(lay.cpu_tensors)} tensor(s) of layer {lay.boundary_layer(facts.n_layer)}"
    src = {
        "fit_args": line,
        "fit_unknown_flags": list(args.unknown),
        "describe": f"--fit: experts of {where}{extra if lay.cpu_tensors else ''} on CPU",
    }
    reg.add(block, f"fit@{cap_label(c)}", c, "fit", load, lay, pred, src)
    log(f"fit@{cap_label(c)}: {lay.cpu_moe_from} {lay.n_cpu_moe} + {len(lay.cpu_tensors)} tensors")


# --------------------------------------------------------------------------------------
# Running


def _nvml_memory() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:
        return None


def nvml_used_mib() -> float | None:
    m = _nvml_memory()
    return None if m is None else float(m.used) / MIB


def nvml_free_mib() -> float | None:
    m = _nvml_memory()
    return None if m is None else float(m.free) / MIB


class WorkerDied(Exception):
    pass


class Worker:
    """worker.py as a child process; one job at a time."""

    def __init__(self, res: Path, n: int) -> None:
        self.err_path = res / f"worker-{n}.err"
        self.baseline_mib = nvml_used_mib()  # before this process has a CUDA context
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.err_path, "ab"),  # noqa: SIM115 (the child owns it)
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.buf = b""
        self.jobs = 0
        try:
            while self.readline(120) != "READY":
                pass
        except (TimeoutError, WorkerDied):
            self.stop()
            raise

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerDied
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.jobs += 1
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError as err:
            raise WorkerDied from err
        while True:
            line = self.readline(timeout)
            if line.startswith("RESULT "):
                return dict(json.loads(line[7:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def death(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "hung (killed)"
        if rc < 0:
            return f"died with {signal.Signals(-rc).name}"
        return f"exited with {rc}"

    def stderr_tail(self, n: int = 6000) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Bench:
    def __init__(
        self, model: str, res: Path, mirror: Path | None, deadline: float, s: Settings
    ) -> None:
        self.model, self.res, self.mirror, self.deadline, self.s = model, res, mirror, deadline, s
        self.results = res / "results.jsonl"
        self.done: set[tuple[str, int]] = set()
        self.walls: dict[str, list[float]] = {}
        self.footprint: dict[str, float] = {}
        self.worker: Worker | None = None
        self.n_workers = 0
        self.skipped = 0
        self.usable: dict[float, int] = {}  # card (GiB) → bytes the planner may use on it
        self.worker_failures = 0
        self.extra_bufts_off = False
        if self.results.exists():
            for line in self.results.read_text().splitlines():
                r = json.loads(line)
                self.done.add((r["config"], r["round"]))
                self._note(r)

    def _note(self, r: dict[str, Any]) -> None:
        # A worker's first run also paid for its start: not a run's usual length.
        if r.get("wall_s") and not r.get("first_in_worker"):
            self.walls.setdefault(r["config"], []).append(float(r["wall_s"]))
        if r.get("footprint_mib") is not None:
            self.footprint[r["config"]] = float(r["footprint_mib"])

    def sync(self, *names: str) -> None:
        if self.mirror is None:
            return
        for name in names:
            src = self.res / name
            if src.exists():
                shutil.copyfile(src, self.mirror / name)

    def estimate(self, cfg: Config) -> float:
        own = self.walls.get(cfg.id)
        if own:
            return statistics.median(own)
        # Not measured yet: as long as the slowest placement measured so far.
        every = [statistics.median(ws) for ws in self.walls.values() if ws]
        default = 8.0 if self.s.dry else 25.0
        return max(every) if every else default

    def infeasible(self, cfg: Config) -> bool:
        """A sweep placement that does not fit any card it stands for (measured footprint)."""
        if not cfg.prunable():
            return False
        if cfg.id in self.footprint:
            need = self.footprint[cfg.id]
            return all(need > cap * 1024 for cap in cfg.caps())
        # No NVML (a dry run): the planner's own budget for each card says.
        gpu = cfg.predicted["gpu_used"]
        return self.s.dry and all(gpu > self.usable.get(cap, 0) for cap in cfg.caps())

    def run_block(self, block: str, configs: list[Config]) -> None:
        order = runner.schedule(len(configs), self.s.rounds)
        todo = [(r, i) for r, i in order if (configs[i].id, r) not in self.done]
        log(f"block {block}: {len(configs)} placements, {len(todo)} of {len(order)} runs to do")
        skipped = 0
        for rnd, i in todo:
            cfg = configs[i]
            if (cfg.id, rnd) in self.done:
                continue
            if rnd > 0 and self.infeasible(cfg):
                log(f"  {cfg.name} r{rnd}: not repeated (does not fit {cfg.caps()} GiB)")
                continue
            est = self.estimate(cfg) + (0 if self.worker else 8.0)
            left = self.deadline - time.time()
            if est > left:
                skipped += 1
                continue
            self.run_one(block, cfg, rnd, timeout=min(max(90.0, 4 * est), left + 20))
        if skipped:
            self.skipped += skipped
            log(f"block {block}: {skipped} runs skipped, too little time left")

    def run_one(self, block: str, cfg: Config, rnd: int, timeout: float) -> None:
        if self.extra_bufts_off and cfg.load.extra_bufts:
            cfg.load = replace(cfg.load, extra_bufts=False)
        job = {
            "id": f"{cfg.id}-r{rnd}",
            "model": self.model,
            "label": cfg.label,
            "round": rnd,
            "load": asdict(cfg.load),
            "layout": asdict(cfg.layout),
            "settings": asdict(self.s.bench()),
        }
        t0 = time.time()
        first = False
        w: Worker | None = None
        try:
            if self.worker is None:
                self.n_workers += 1
                self.worker = Worker(self.res, self.n_workers)
            w = self.worker
            first = w.jobs == 0
            out = w.run(job, timeout)
        except (TimeoutError, WorkerDied):
            w = w or self.worker
            self.worker = None
            why = "did not start"
            tail = ""
            if w is not None:
                w.stop()
                why, tail = w.death(), w.stderr_tail()
                time.sleep(0 if self.s.dry else 2)  # the driver frees its memory: next baseline
            else:
                err = self.res / f"worker-{self.n_workers}.err"
                tail = err.read_text(errors="replace")[-6000:] if err.exists() else ""
            with open(self.res / "failures.log", "a") as f:
                f.write(f"== {cfg.name} round {rnd}: worker {why}\n{tail}\n")
            self.sync("failures.log")
            self.worker_failures += 1
            if self.worker_failures >= 3 and self.worker_failures == self.n_workers:
                raise SystemExit("the worker fails every time: see failures.log") from None
            if "SIGILL" in why and cfg.load.extra_bufts and not self.extra_bufts_off:
                log(f"  {cfg.name}: SIGILL (llama.cpp's extra CPU kernels): all runs without them")
                self.extra_bufts_off = True
                return self.run_one(block, cfg, rnd, timeout)
            out = {"run": asdict(runner.Run(0, rnd, error=f"worker {why}"))}
        wall = time.time() - t0
        base = w.baseline_mib if w is not None else None
        used = out.get("used_mib")
        foot = round(used - base, 1) if used is not None and base is not None else None
        rec = {
            **cfg.describe(),
            "block": block,
            "round": rnd,
            "run": out["run"],
            "footprint_mib": foot,
            "idle_mib": round(out["idle_mib"] - base, 1)
            if out.get("idle_mib") is not None and base is not None
            else None,
            "buffers": out.get("buffers"),
            "n_overridden": out.get("n_overridden"),
            "wall_s": round(wall, 2),
            "first_in_worker": first,
            "worker": self.n_workers,
            "at": round(time.time(), 1),
            "dry_run": self.s.dry,
        }
        with open(self.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done.add((cfg.id, rnd))
        self._note(rec)
        r = out["run"]
        if r.get("error"):
            log(f"  {cfg.name} r{rnd}: FAILED {r['error'][:300]}")
            if not r["error"].startswith("worker "):  # a dead worker is written up already
                with open(self.res / "failures.log", "a") as f:
                    f.write(f"== {cfg.name} round {rnd}: {r['error']}\n")
        else:
            log(
                f"  {cfg.name} r{rnd}: decode {r['decode_tok_s']:.1f} tok/s (predicted "
                f"{cfg.predicted['decode_tok_s']:.1f}), prefill {r['prefill_tok_s']:.0f}, "
                f"gen {r['generated_tokens']}, GPU {foot if foot is not None else '-'} MiB, "
                f"load {r['load_s']:.1f} s, wall {wall:.1f} s"
            )
        summary.write(self.res)
        self.sync("results.jsonl", "summary.md", "failures.log")
        return None

    def close(self) -> None:
        if self.worker is not None:
            assert self.worker.proc.stdin is not None
            self.worker.proc.stdin.close()
            try:
                self.worker.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.worker.stop()
            self.worker = None


# --------------------------------------------------------------------------------------


def parse_caps(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(int(float(part) * GIB) if re.fullmatch(r"[\d.]+", part) else parse_size(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="the GGUF to measure")
    ap.add_argument("--out", type=Path, help="results folder (kept; a rerun continues it)")
    ap.add_argument("--mirror", type=Path, help="copy results here after each run ($OUT)")
    ap.add_argument("--deadline", type=float, help="epoch seconds: start no run ending later")
    ap.add_argument("--bin", type=Path, help="llama.cpp's bin folder (llama-fit-params)")
    ap.add_argument("--caps", help="card sizes, GiB or with units (default 16,12,8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep", type=int, default=3, help="--n-cpu-moe ± this around the plan")
    ap.add_argument("--prompt", type=int, help="prompt tokens (512; dry run 64)")
    ap.add_argument("--gen", type=int, help="decoded tokens (128; dry run 16)")
    ap.add_argument("--ctx", type=int, help="context (32768; dry run 4096)")
    ap.add_argument("--blocks", help="blocks to run, in order (default: all, core first)")
    ap.add_argument("--dry-run", action="store_true", help="CPU machine: no CUDA, no full")
    ap.add_argument("--summarize", type=Path, help="only rewrite DIR/summary.md")
    a = ap.parse_args(argv)
    if a.summarize:
        print(summary.write(a.summarize).read_text())
        return 0
    if not a.model or not a.out:
        ap.error("MODEL and --out are needed")
    s = Settings(
        prompt=a.prompt or (64 if a.dry_run else 512),
        gen=a.gen or (16 if a.dry_run else 128),
        ctx=a.ctx or (4096 if a.dry_run else 32768),
        kv="f16",
        rounds=a.rounds,
        sweep=a.sweep,
        dry=a.dry_run,
    )
    res: Path = a.out
    res.mkdir(parents=True, exist_ok=True)
    if a.mirror:
        a.mirror.mkdir(parents=True, exist_ok=True)
    deadline = a.deadline or time.time() + 3600

    hw = hwprobe.probe(check_backend=False, measure=not a.dry_run)
    # Whether llama.cpp's extra CPU kernels (AMX) run here, asked of a child process: this
    # process must hold no CUDA context (NVML's baseline, llama-fit-params' free memory).
    from qwenrun.engine import crash

    check = crash.cpu_check(hw.cpu_model, hw.cpu_flags)
    extra_bufts = check.extra_bufts
    gpu = hw.gpus[0] if hw.gpus else None
    if not a.dry_run and gpu is None:
        log("no GPU found: use --dry-run on a machine without one")
        return 2
    device = f"{gpu.name}, {gpu.total_bytes / GIB:.0f} GiB" if gpu else "CPU only (dry run)"
    log(
        f"machine: {device}; {hw.cpu_model}, {hw.physical_cores}/{hw.logical_cores} cores, "
        f"{hw.ram_total_bytes / GIB:.0f} GiB RAM, RAM bandwidth {hw.cpu_bandwidth_gbs} GB/s "
        f"({hw.cpu_bandwidth_source}); extra CPU kernels: {check.describe()}"
    )
    facts = ModelFacts.from_info(header.read_local(a.model))
    caps = parse_caps(a.caps) if a.caps else None
    if caps is None:
        caps = dry_caps(facts, s) if a.dry_run else [16 * GIB, 12 * GIB, 8 * GIB]
    fitter = None
    fit_check = None
    if a.dry_run:
        fit_check = check_fit_parser()
        log(f"fit parser: {fit_check}")
    if a.bin and (a.bin / "llama-fit-params").exists():
        fitter = Fitter(a.bin / "llama-fit-params", a.model, s, res)
    elif not a.dry_run:
        log("no llama-fit-params (--bin): no fit configs")
    reg, info = plan_everything(a.model, hw, facts, caps, s, fitter, extra_bufts)
    staged = ROOT / "build" / "gpu-in" / "STAGED"
    info.update(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": device,
            "machine": {
                "cpu": hw.cpu_model,
                "physical_cores": hw.physical_cores,
                "logical_cores": hw.logical_cores,
                "ram_gib": round(hw.ram_total_bytes / GIB, 1),
                "cpu_bandwidth_gbs": hw.cpu_bandwidth_gbs,
                "cpu_bandwidth_source": hw.cpu_bandwidth_source,
                "gpu_bandwidth_gbs": gpu.mem_bandwidth_gbs if gpu else None,
                "gpu_pcie": gpu.pcie if gpu else None,
                "extra_cpu_kernels": check.describe(),
                "default_threads": hw.physical_cores,
            },
            "model": {"path": a.model, "arch": facts.arch, "n_layer": facts.n_layer},
            "settings": asdict(s),
            "speed_params": speed.describe(speed.DEFAULT),
            "staged": staged.read_text() if staged.exists() else None,
            "fit_parser_check": fit_check,
            "blocks": reg.blocks,
            "configs": {cid: c.describe() for cid, c in reg.configs.items()},
        }
    )
    (res / "plans.json").write_text(json.dumps(info, indent=1, default=str))
    if "llama_cpp" in sys.modules:  # NVML's baseline would hold a CUDA context of ours
        log("warning: llama.cpp is loaded in this process; footprints may be off")
    bench = Bench(a.model, res, a.mirror, deadline - 5, s)
    bench.usable = {float(c): v["usable_bytes"] for c, v in info["caps"].items()}
    bench.sync("plans.json", "fit.log")
    summary.write(res)
    bench.sync("summary.md")
    wanted = a.blocks.split(",") if a.blocks else list(reg.blocks)
    log(f"blocks: {', '.join(f'{b} ({len(reg.blocks.get(b, []))})' for b in wanted)}")
    try:
        for block in wanted:
            if block not in reg.blocks:
                log(f"no block {block!r}; there are {', '.join(reg.blocks)}")
                continue
            bench.run_block(block, [reg.configs[c] for c in reg.blocks[block]])
    finally:
        bench.close()
        summary.write(res)
        bench.sync("results.jsonl", "summary.md", "failures.log")
    log(f"done: {len(bench.done)} runs in results.jsonl, {bench.skipped} skipped for time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
