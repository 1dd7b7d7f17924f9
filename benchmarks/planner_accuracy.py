"""Planner accuracy: the bytes `offload.plan` predicts per buffer vs what llama.cpp allocates.

Contract: writes generated GGUFs (tiny models with Qwen's real 151,936/248,320-token
vocabularies; with `--real`, cut-down synthetic Qwen3-30B-A3B / Qwen3.5-35B-A3B Q4_K_M files
with the real per-layer shapes), plans each for a few contexts on this machine, loads it with
the planned `LoadConfig` through `llama.Engine`, and compares the planner's predicted
bytes with the buffer sizes llama.cpp logs (model, KV, recurrent state, compute, output),
per device. On a machine whose llama.cpp can use a GPU it also plans with part and all of
the routed experts on the CPU, so both devices' buffers are checked. Target: every buffer
within 3 % or 64 MiB. It prints a Markdown table; `--results` writes it into
benchmarks/RESULTS.md under "Planner accuracy" (only that section is replaced).

    python benchmarks/planner_accuracy.py                 # tiny models, ~1 minute on 2 cores
    python benchmarks/planner_accuracy.py --real          # + real-shape files (~4 GB in --dir)
    python benchmarks/planner_accuracy.py --real --results
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwenrun import hwprobe, offload  # noqa: E402
from qwenrun.engine import llama, llamalog, native  # noqa: E402
from qwenrun.offload import Wishes  # noqa: E402
from qwenrun.synthetic.tiny_gguf import write_model  # noqa: E402

MIB = 1 << 20
KINDS = ("model", "kv", "rs", "compute", "output")
TOLERANCE = 0.03
TOLERANCE_BYTES = 64 * MIB


@dataclass(frozen=True)
class Case:
    label: str
    path: Path
    wishes: Wishes


@dataclass(frozen=True)
class Row:
    case: str
    buffer: str
    predicted: int
    actual: int

    @property
    def diff(self) -> int:
        return self.predicted - self.actual

    @property
    def ok(self) -> bool:
        return abs(self.diff) <= max(TOLERANCE * self.actual, TOLERANCE_BYTES)


def tiny_cases(folder: Path) -> Iterator[Case]:
    for arch in ("qwen3moe", "qwen35moe", "qwen3next", "qwen3"):
        vocab = 248320 if arch == "qwen35moe" else 151936
        path = write_model(folder, arch, n_layer=4, vocab_size=vocab, dtype="f16")
        for ctx in (4096, 32768):
            yield Case(f"tiny {arch}, ctx {ctx}", path, Wishes(n_ctx=ctx))
    # A 265-token vocabulary at a long context: the attention phase is the compute peak.
    for arch in ("qwen3moe", "qwen35moe"):
        path = write_model(folder, arch, n_layer=4, dtype="f16")
        yield Case(f"tiny {arch} (265 tokens), ctx 131072", path, Wishes(n_ctx=131072))


def real_cases(folder: Path) -> Iterator[Case]:
    import synthetic_model as synth

    for model, layers in (("qwen3-30b-a3b", 2), ("qwen3.5-35b-a3b", 4)):
        path = folder / f"{model}-{layers}l-Q4_K_M.gguf"
        if not path.exists():
            synth.write_model(path, synth.resolve_shape(model, layers=layers))
        for ctx in (4096, 32768, 262144):
            yield Case(f"{model} Q4_K_M ({layers} layers), ctx {ctx}", path, Wishes(n_ctx=ctx))


def gpu_variants(case: Case, n_layer: int) -> Iterator[Case]:
    """With a GPU: the planner's own split, half the experts on the CPU, all of them."""
    yield case
    for n, what in ((max(1, n_layer // 2), "half"), (n_layer, "all")):
        yield Case(
            f"{case.label}, {what} experts on CPU", case.path, replace(case.wishes, n_cpu_moe=n)
        )


def actual_bytes(report: llamalog.PlacementReport, kind: str, device: str) -> int:
    if device == "CPU":
        return report.total(kind, "CPU")
    return report.total(kind) - report.total(kind, "CPU")


def measure(case: Case, hw: hwprobe.HardwareProfile) -> list[Row]:
    plan = offload.plan_for_file(case.path, hw, case.wishes)
    predicted = plan.predicted_buffers()
    with llama.Engine.load(case.path, plan.load) as engine:
        report = engine.placement
    devices = ["CPU"] + (["GPU"] if plan.gpu is not None else [])
    rows = []
    for device in devices:
        for kind in KINDS:
            guess = predicted.get((kind, device), 0)
            actual = actual_bytes(report, kind, device)
            if guess or actual:
                rows.append(Row(case.label, f"{kind} ({device})", guess, actual))
    return rows


def table(rows: list[Row]) -> str:
    out = [
        "| model, context | buffer | predicted MiB | llama.cpp MiB | diff MiB | diff % | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{100 * r.diff / r.actual:+.1f}" if r.actual else "-"
        out.append(
            f"| {r.case} | {r.buffer} | {r.predicted / MIB:,.2f} | {r.actual / MIB:,.2f} | "
            f"{r.diff / MIB:+,.2f} | {pct} | {'yes' if r.ok else '**no**'} |"
        )
    return "\n".join(out)


def write_results(text: str, command: str, hw: hwprobe.HardwareProfile) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    gpus = ", ".join(g.name for g in hw.gpus) or "no GPU"
    section = (
        "## Planner accuracy\n\n"
        f"`{command}` — {dt.date.today().isoformat()}, {hw.cpu_model} "
        f"({hw.logical_cores} logical CPUs), {gpus}, llama-cpp-python "
        f"{native.llama_cpp_version()}, Python {platform.python_version()}. Predicted bytes "
        "are `offload.plan_for_file(...).predicted_buffers()` for the plan loaded; llama.cpp's "
        "are the buffer sizes it logs while loading (two decimals of MiB). Target: each buffer "
        "within 3 % or 64 MiB."
        + (
            ""
            if hw.gpus
            else " No GPU here, so only the CPU side is checked; the GPU buffers (and the "
            "op-offload copies in the GPU compute buffer) wait for a run on a GPU machine."
        )
        + "\n\n"
        + text
        + "\n"
    )
    pattern = re.compile(r"## Planner accuracy\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(body):
        body = pattern.sub(lambda _m: section.rstrip("\n"), body)
    else:
        body = body.rstrip("\n") + "\n\n" + section
    path.write_text(body if body.endswith("\n") else body + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="also real-shape synthetic files")
    ap.add_argument("--dir", type=Path, help="where to write the models (default: a temp dir)")
    ap.add_argument("--results", action="store_true", help="write the table to RESULTS.md")
    args = ap.parse_args(argv)

    hw = hwprobe.probe()
    if not native.supports_gpu_offload():
        hw = replace(hw, gpus=())
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        cases = list(tiny_cases(folder / "tiny"))
        if args.real:
            cases += list(real_cases(folder / "real"))
        rows: list[Row] = []
        for case in cases:
            variants = gpu_variants(case, 4) if hw.gpus else iter([case])
            for variant in variants:
                print(f"… {variant.label}", file=sys.stderr)
                rows += measure(variant, hw)
    text = table(rows)
    bad = [r for r in rows if not r.ok]
    summary = f"\n{len(rows) - len(bad)} of {len(rows)} buffers within 3 % or 64 MiB."
    print(text + summary)
    if args.results:
        command = "python benchmarks/planner_accuracy.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        )
        write_results(text + "\n" + summary.strip(), command, hw)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
