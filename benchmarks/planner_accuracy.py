"""Planner accuracy: the bytes `offload.plan` predicts per buffer vs what llama.cpp allocates.

Contract: writes generated GGUFs (tiny models with Qwen's real 151,936/248,320-token
vocabularies, Qwen3.8-Flash-Next's `qwen4exp` among them; with `--real`, cut-down synthetic
Qwen3-30B-A3B / Qwen3.5-35B-A3B Q4_K_M files and a Q4_K Qwen3.8-Flash-Next slice with the
real per-layer shapes), plans each for a few contexts on this machine, loads it with the
planned `LoadConfig` through `llama.Engine`, and compares the planner's predicted bytes with
the buffer sizes llama.cpp logs (model, KV, recurrent state, compute, output; for qwen4exp
also the indexer's part of the KV cache, and the n-gram table's own mapping when the plan
leaves it in the file, "lazy"), per device. On a machine whose llama.cpp can use a GPU it
also plans with part and all of the routed experts on the CPU, so both devices' buffers are
checked. Target: every buffer within 3 % or 64 MiB. It prints a Markdown table; `--results`
writes it into benchmarks/RESULTS.md under "Planner accuracy" (only that section is replaced).

    python benchmarks/planner_accuracy.py                 # tiny models, ~1 minute on 2 cores
    python benchmarks/planner_accuracy.py --real          # + real-shape files (~4 GB in --dir)
    python benchmarks/planner_accuracy.py --real --results
    python benchmarks/planner_accuracy.py --real --logits --results   # the logits reserve

`--logits` measures instead what the engine's one-token logits reserve saves: each file with
Qwen's vocabulary loaded twice at n_ctx 4,096, with llama.cpp's default `n_outputs_max`
(n_batch) and with the engine's (`LoadConfig.n_outputs_max`, 1), its CPU compute buffer as
llama.cpp logs it; `--results` writes that table under its own section.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwenrun import hwprobe, offload  # noqa: E402
from qwenrun.engine import llama, llamalog, native  # noqa: E402
from qwenrun.engine.loadconfig import LoadConfig  # noqa: E402
from qwenrun.hub import header  # noqa: E402
from qwenrun.offload import Wishes  # noqa: E402
from qwenrun.planner.facts import ModelFacts, kv_row_bytes, pad_ctx  # noqa: E402
from qwenrun.synthetic.qwen4exp import Qwen4ExpDims  # noqa: E402
from qwenrun.synthetic.tiny_gguf import write_model  # noqa: E402

MIB = 1 << 20
KINDS = ("model", "kv", "rs", "compute", "output", "lazy")
# Qwen3.8-Flash-Next's per-layer shapes (reference/qwen38.md §1.1) with 12 of its 512 experts
# and a 65,536-row n-gram table: a slice of the real model.
FLASH_NEXT_DIMS = Qwen4ExpDims(
    ple_row=160, ngram=3, heads_per_ngram=8, n_head=24, n_head_kv=2, head_dim=256,
    n_expert=12, n_expert_used=10, expert_ff=640, shexp_ff=640, ssm_state=128,
    ssm_groups=16, ssm_v_heads=48, ssm_conv=4, hc=4, hc_rank=320, idx_heads=4,
    idx_dim=128, idx_top_k=2048, compress_ratio=4, ple_layer=1, ple_conv=4, ple_rows=1 << 16,
)  # fmt: skip
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
    for arch in ("qwen3moe", "qwen35moe", "qwen3next", "qwen3", "qwen4exp"):
        vocab = 248320 if arch in ("qwen35moe", "qwen4exp") else 151936
        path = write_model(folder / arch, arch, n_layer=4, vocab_size=vocab, dtype="f16")
        for ctx in (4096, 32768):
            yield Case(f"tiny {arch}, ctx {ctx}", path, Wishes(n_ctx=ctx))
        if arch == "qwen4exp":  # the n-gram table left in the file: its own mapping
            wishes = Wishes(n_ctx=32768, ngram_table="disk")
            yield Case(f"tiny {arch}, ctx 32768, n-gram table on disk", path, wishes)
    # A 265-token vocabulary at a long context: the attention phase is the compute peak (for
    # qwen4exp, its sparse attention's indexer).
    for arch in ("qwen3moe", "qwen35moe", "qwen4exp"):
        path = write_model(folder / f"{arch}-265", arch, n_layer=4, dtype="f16")
        yield Case(f"tiny {arch} (265 tokens), ctx 131072", path, Wishes(n_ctx=131072))


def real_cases(folder: Path) -> Iterator[Case]:
    import synthetic_model as synth

    for model, layers in (("qwen3-30b-a3b", 2), ("qwen3.5-35b-a3b", 4)):
        path = folder / f"{model}-{layers}l-Q4_K_M.gguf"
        if not path.exists():
            synth.write_model(path, synth.resolve_shape(model, layers=layers))
        for ctx in (4096, 32768, 262144):
            yield Case(f"{model} Q4_K_M ({layers} layers), ctx {ctx}", path, Wishes(n_ctx=ctx))
    flash = folder / "qwen3.8-flash-next-4l"
    found = sorted(flash.glob("*.gguf"))
    path = (
        found[0]
        if found
        else write_model(
            flash, "qwen4exp", n_layer=4, vocab_size=248320, dtype="q4_k", dims=FLASH_NEXT_DIMS
        )
    )
    label = "qwen3.8-flash-next Q4_K (4 layers, 12 experts)"
    for ctx in (4096, 32768, 262144):
        yield Case(f"{label}, ctx {ctx}", path, Wishes(n_ctx=ctx))
    yield Case(f"{label}, ctx 32768, table on disk", path, Wishes(n_ctx=32768, ngram_table="disk"))


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
    facts = ModelFacts.from_info(header.read_local(case.path))
    if facts.indexer_dim:  # the indexer's share of the KV cache, on its own
        cells = pad_ctx(plan.load.n_ctx)
        row = kv_row_bytes(plan.load.kv_type, facts.indexer_dim)
        guess = cells * len(facts.attn_layers) * row
        rows.append(Row(case.label, "kv indexer (all)", guess, report.total("kv", part="indexer")))
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


def logits_table(paths: list[tuple[str, Path]]) -> str:
    """The CPU compute buffer with llama.cpp's default logits reserve and with the engine's."""
    out = [
        "| model (n_ctx 4,096) | n_ubatch | llama.cpp's default (n_batch) MiB | "
        "n_outputs_max 1 MiB | saved MiB |",
        "|---|---|---|---|---|",
    ]
    for label, path in paths:
        for ub in (512, 2048):
            got = []
            for n_out in (0, LoadConfig().n_outputs_max):
                config = LoadConfig(n_ctx=4096, n_ubatch=ub, n_outputs_max=n_out)
                with llama.Engine.load(path, replace(config, prompt_cache=0)) as engine:
                    got.append(engine.placement.total("compute", "CPU") / MIB)
            out.append(
                f"| {label} | {ub:,} | {got[0]:,.2f} | {got[1]:,.2f} | {got[0] - got[1]:,.2f} |"
            )
    return "\n".join(out)


LOGITS_TITLE = "Compute buffer: the logits of one token per batch (issue 17)"
LOGITS_TEXT = (
    "Each file loaded twice through `llama.Engine` (n_ctx 4,096, n_batch 2,048), with "
    "llama.cpp's default `n_outputs_max` (n_batch) and with the engine's, 1; the CPU compute "
    "buffer as llama.cpp logs it. The default reserves n_ubatch × n_vocab f32 of logits; the "
    "engine only ever samples the last token of a batch (`llama_batch_get_one`), so it asks "
    "for one. On a GPU the same reserve sits in VRAM when the output layer is there (the "
    "planner counts one token's logits on either device; not yet measured on a GPU)."
)


def write_results(
    text: str,
    command: str,
    hw: hwprobe.HardwareProfile,
    title: str = "Planner accuracy",
    about: str | None = None,
) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    gpus = ", ".join(g.name for g in hw.gpus) or "no GPU"
    if about is not None:
        section = (
            f"## {title}\n\n`{command}` — {dt.date.today().isoformat()}, {hw.cpu_model} "
            f"({hw.logical_cores} logical CPUs), {gpus}, llama-cpp-python "
            f"{native.llama_cpp_version()}. {about}\n\n{text}\n"
        )
        _replace_section(path, body, title, section)
        return
    section = (
        "## Planner accuracy\n\n"
        f"`{command}` — {dt.date.today().isoformat()}, {hw.cpu_model} "
        f"({hw.logical_cores} logical CPUs), {gpus}, llama-cpp-python "
        f"{native.llama_cpp_version()}, Python {platform.python_version()}. Predicted bytes "
        "are `offload.plan_for_file(...).predicted_buffers()` for the plan loaded; llama.cpp's "
        'are the buffer sizes it logs while loading (two decimals of MiB); "lazy" is the '
        "n-gram table's own mapping of the file when the plan leaves it there (not memory), "
        '"kv indexer" the lightning indexer\'s part of the KV cache. Target: each buffer '
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
    _replace_section(path, body, title, section)


def _replace_section(path: Path, body: str, title: str, section: str) -> None:
    """Only the section with this title is replaced (added at the end when absent)."""
    pattern = re.compile(rf"## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
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
    ap.add_argument("--logits", action="store_true", help="measure the logits reserve instead")
    args = ap.parse_args(argv)

    hw = hwprobe.probe()
    if not native.supports_gpu_offload():
        hw = replace(hw, gpus=())
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        cases = list(tiny_cases(folder / "tiny"))
        if args.real:
            cases += list(real_cases(folder / "real"))
        if args.logits:
            return _logits(cases, hw, args.results, argv)
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


def _logits(cases: list[Case], hw: hwprobe.HardwareProfile, results: bool, argv: Any) -> int:
    seen: dict[Path, str] = {}
    for case in cases:  # each file once, those with Qwen's vocabulary (the tiny ones: 265)
        if "265 tokens" not in case.label and case.path not in seen:
            seen[case.path] = case.label.split(", ctx")[0]
    text = logits_table([(label, path) for path, label in seen.items()])
    print(text)
    if results:
        command = "python benchmarks/planner_accuracy.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        )
        write_results(text, command, hw, LOGITS_TITLE, LOGITS_TEXT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
