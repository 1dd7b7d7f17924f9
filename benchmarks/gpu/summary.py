"""The GPU kit's summary: issue 11's targets from results.jsonl, with medians and spread.

Contract: `write(folder)` reads folder/plans.json (the placements, their names, the planner's
predictions; measure.py writes it before the first run) and folder/results.jsonl (one line
per run), and writes folder/summary.md: the targets P3a (auto ÷ `--fit`), P3b (auto ÷ the
best `--n-cpu-moe` whose footprint fits the card), P3c (predicted ÷ measured decode) and P4
(expert offload ÷ the best layer offload), then every placement per card, then bytes. A
ratio of two placements is given as the ratio of their medians and its spread, the range
from the worst to the best pairing of single runs (min ÷ max … max ÷ min). Pure: it reads
two files and writes one; measure.py calls it after every run.

    python benchmarks/gpu/summary.py DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20

# issue 11's targets
P3A_MIN = 1.05
P3B_MIN = 1.00
P3C_MEDIAN = (0.9, 1.1)
P3C_EACH = (0.7, 1.3)
P4_DECODE_MIN = 1.3
P4_PREFILL_MIN = 2.0


@dataclass
class Stats:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else 0.0

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else 0.0

    def text(self, digits: int = 1) -> str:
        if not self.values:
            return "–"
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.lo:.{digits}f}–{self.hi:.{digits}f}]"


@dataclass
class Entry:
    """One placement under one of its names (the same runs stand for every name)."""

    name: str
    cap: float | None
    kind: str
    cfg: dict[str, Any]
    decode: Stats
    prefill: Stats
    failed: int
    footprint: float | None  # NVML MiB, the largest seen
    buffers: dict[str, int] = field(default_factory=dict)  # llama.cpp's, kind/GPU|CPU
    first_runs: int = 0
    usable: int | None = None  # bytes the planner may use on this card

    @property
    def predicted(self) -> dict[str, Any]:
        return dict(self.cfg.get("predicted") or {})

    def fits(self) -> bool | None:
        """Footprint ≤ card (NVML); without NVML (a dry run), the planner's own budget."""
        if self.cap is None:
            return None
        if self.footprint is not None:
            return self.footprint <= self.cap * 1024
        gpu = self.predicted.get("gpu_used")
        return None if gpu is None or self.usable is None else gpu <= self.usable

    @property
    def describe(self) -> str:
        src = self.cfg.get("source") or {}
        return str(src.get("describe") or self.cfg["placement"]["describe"])

    @property
    def title(self) -> str:
        primary = self.cfg["names"][0][0]
        return self.name if primary == self.name else f"{self.name} (= {primary})"


@dataclass
class Ratio:
    median: float
    lo: float
    hi: float
    runs: str

    def text(self) -> str:
        return f"{self.median:.2f} ({self.lo:.2f}–{self.hi:.2f})"


def ratio(a: Stats, b: Stats) -> Ratio | None:
    if not a.n or not b.n or not b.median or not b.lo:
        return None
    return Ratio(a.median / b.median, a.lo / b.hi, a.hi / b.lo, f"{a.n}÷{b.n}")


def _device(buft: str) -> str:
    up = buft.upper()
    return "CPU" if up.startswith("CPU") or up.endswith("_HOST") else "GPU"


def load(folder: Path) -> tuple[dict[str, Any], list[Entry], list[dict[str, Any]]]:
    plans = json.loads((folder / "plans.json").read_text())
    runs: list[dict[str, Any]] = []
    path = folder / "results.jsonl"
    if path.exists():
        runs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    gen = int(plans.get("settings", {}).get("gen", 0))
    usable = {c: v.get("usable_bytes") for c, v in plans.get("caps", {}).items()}
    by_cfg: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_cfg.setdefault(r["config"], []).append(r)
    entries: list[Entry] = []
    for cid, cfg in plans.get("configs", {}).items():
        mine = by_cfg.get(cid, [])
        ok = [
            r
            for r in mine
            if not r["run"].get("error") and (not gen or r["run"]["generated_tokens"] == gen)
        ]
        feet = [r["footprint_mib"] for r in mine if r.get("footprint_mib") is not None]
        bufs: dict[str, int] = {}
        last = next((r for r in reversed(mine) if r.get("buffers")), None)
        for kind, buft, n in (last or {}).get("buffers") or ():
            key = f"{kind}/{_device(buft)}"
            bufs[key] = bufs.get(key, 0) + int(n)
        for name, cap, kind, _block in cfg["names"]:
            entries.append(
                Entry(
                    name,
                    cap,
                    kind,
                    cfg,
                    Stats([r["run"]["decode_tok_s"] for r in ok]),
                    Stats([r["run"]["prefill_tok_s"] for r in ok]),
                    len(mine) - len(ok),
                    max(feet) if feet else None,
                    bufs,
                    sum(1 for r in ok if r.get("first_in_worker")),
                    usable.get(f"{cap:g}") if cap is not None else None,
                )
            )
    return plans, entries, runs


def _verdict(value: float | None, ok: bool | None, robust: bool | None = None) -> str:
    if value is None or ok is None:
        return "no data"
    if not ok:
        return "not met"
    return "met, across the spread" if robust else "met (median)"


def _best(entries: list[Entry]) -> Entry | None:
    have = [e for e in entries if e.decode.n]
    return max(have, key=lambda e: e.decode.median) if have else None


def targets(plans: dict[str, Any], entries: list[Entry]) -> list[str]:
    caps = sorted({e.cap for e in entries if e.cap is not None}, reverse=True)
    rows = [
        "| target | card | placements | ratio of medians (spread) | runs | verdict |",
        "|---|---|---|---|---|---|",
    ]

    def at(cap: float, kind: str) -> list[Entry]:
        return [e for e in entries if e.cap == cap and e.kind == kind]

    def row(t: str, cap: float, what: str, r: Ratio | None, need: float) -> None:
        if r is None:
            rows.append(f"| {t} | {cap:g} GiB | {what} | – | – | no data |")
            return
        v = _verdict(r.median, r.median >= need, r.lo >= need)
        rows.append(f"| {t} | {cap:g} GiB | {what} | {r.text()} | {r.runs} | {v} |")

    for cap in caps:
        auto = next(iter(at(cap, "auto")), None)
        if auto is None:
            continue
        fit = next(iter(at(cap, "fit")), None)
        if fit is not None:
            row(
                f"P3a ≥ {P3A_MIN}",
                cap,
                f"{auto.name} ÷ {fit.name}",
                ratio(auto.decode, fit.decode),
                P3A_MIN,
            )
        else:
            row(f"P3a ≥ {P3A_MIN}", cap, "no --fit run", None, P3A_MIN)
        sweep = [e for e in at(cap, "ncmoe") if e.fits()]
        best = _best(sweep)
        what = f"{auto.name} ÷ {best.name} (best that fits the card)" if best else "no feasible run"
        row(
            f"P3b ≥ {P3B_MIN:.2f}",
            cap,
            what,
            ratio(auto.decode, best.decode) if best else None,
            P3B_MIN,
        )
        same = [
            e
            for e in sweep
            if auto.footprint is not None
            and e.footprint is not None
            and e.footprint <= auto.footprint + 64
        ]
        best_same = _best(same)
        if best_same is not None:
            row(
                "P3b, same VRAM",
                cap,
                f"{auto.name} ÷ {best_same.name} (footprint ≤ auto's + 64 MiB)",
                ratio(auto.decode, best_same.decode),
                P3B_MIN,
            )
        layers = _best([e for e in at(cap, "layers") if e.fits() is not False])
        if layers is not None:
            what = f"{auto.name} ÷ {layers.name}"
            row(
                f"P4 decode ≥ {P4_DECODE_MIN}",
                cap,
                what,
                ratio(auto.decode, layers.decode),
                P4_DECODE_MIN,
            )
            row(
                f"P4 prefill ≥ {P4_PREFILL_MIN:.0f}",
                cap,
                what,
                ratio(auto.prefill, layers.prefill),
                P4_PREFILL_MIN,
            )
        else:
            row(f"P4 ≥ {P4_DECODE_MIN}", cap, "no layer-offload run", None, P4_DECODE_MIN)
    # P3c over placements (each measured placement once, whatever its names)
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.decode.n and e.cfg["config"] not in seen:
            seen[e.cfg["config"]] = e
    ratios = {
        e.name: e.predicted["decode_tok_s"] / e.decode.median
        for e in seen.values()
        if e.predicted.get("decode_tok_s") and e.decode.median
    }
    lines = ["", *rows, ""]
    if ratios:
        med = statistics.median(ratios.values())
        outside = {k: v for k, v in ratios.items() if not P3C_EACH[0] <= v <= P3C_EACH[1]}
        ok = P3C_MEDIAN[0] <= med <= P3C_MEDIAN[1] and not outside
        lines.append(
            f"**P3c** predicted ÷ measured decode (median of {len(ratios)} placements' medians): "
            f"**{med:.2f}** (target {P3C_MEDIAN[0]}–{P3C_MEDIAN[1]}), range "
            f"{min(ratios.values()):.2f}–{max(ratios.values()):.2f}; outside "
            f"{P3C_EACH[0]}–{P3C_EACH[1]}: "
            + (", ".join(f"{k} {v:.2f}" for k, v in sorted(outside.items())) or "none")
            + f" → {'met' if ok else 'not met'}."
        )
    else:
        lines.append("**P3c**: no measured decode yet.")
    return lines


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / MIB:,.0f}"


def placements(plans: dict[str, Any], entries: list[Entry], rounds: int) -> list[str]:
    out: list[str] = []
    caps = sorted({e.cap for e in entries if e.cap is not None}, reverse=True)
    groups: list[tuple[str, list[Entry]]] = []
    for cap in caps:
        info = plans.get("caps", {}).get(f"{cap:g}", {})
        usable = info.get("usable_bytes")
        head = f"### {cap:g} GiB card" + (
            f" (the planner may use {usable / MIB:,.0f} MiB)" if usable else ""
        )
        groups.append((head, [e for e in entries if e.cap == cap]))
    other = [e for e in entries if e.cap is None]
    if other:
        groups.append(("### No card cap", other))
    for head, group in groups:
        out += [
            "",
            head,
            "",
            "| name | placement | threads | runs | decode tok/s median [min–max] | predicted "
            "| pred÷meas | prefill tok/s median [min–max] | predicted (synthetic) "
            "| GPU MiB predicted / llama.cpp / NVML | fits card |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in sorted(group, key=lambda e: (-e.decode.median, e.name)):
            p = e.predicted
            pr = f"{p['decode_tok_s'] / e.decode.median:.2f}" if e.decode.n else "–"
            gpu_pred = p.get("gpu_used")
            gpu_meas = sum(n for k, n in e.buffers.items() if k.endswith("/GPU")) or None
            fits = {True: "yes", False: "no", None: "–"}[e.fits()]
            runs = f"{e.decode.n}" + (f" (+{e.failed} failed)" if e.failed else "")
            if e.decode.n < rounds:
                runs += " ⚠"
            out.append(
                f"| {e.title} | {e.describe} | {e.cfg['threads']} | {runs} "
                f"| {e.decode.text()} | {p.get('decode_tok_s', 0):.1f} | {pr} "
                f"| {e.prefill.text(0)} | {p.get('prefill_tok_s', 0):.0f} "
                f"({p.get('prefill_tok_s_synthetic', 0):.0f}) "
                f"| {_mib(gpu_pred)} / {_mib(gpu_meas)} / "
                f"{'–' if e.footprint is None else f'{e.footprint:,.0f}'} | {fits} |"
            )
    return out


def bytes_table(entries: list[Entry]) -> list[str]:
    out = [
        "",
        "## Bytes: the planner vs llama.cpp's buffers (MiB, predicted / reported)",
        "",
        "| placement | GPU model | GPU KV | GPU compute | CPU model | CPU compute "
        "| NVML − GPU buffers |",
        "|---|---|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    for e in entries:
        if e.cfg["config"] in seen or not e.buffers:
            continue
        seen.add(e.cfg["config"])
        pb = e.predicted.get("buffers", {})

        def pair(key: str, pb: dict[str, int] = pb, e: Entry = e) -> str:
            return f"{_mib(pb.get(key, 0))} / {_mib(e.buffers.get(key, 0))}"

        gpu = sum(n for k, n in e.buffers.items() if k.endswith("/GPU"))
        extra = "–" if e.footprint is None else f"{e.footprint - gpu / MIB:,.0f}"
        out.append(
            f"| {e.name} | {pair('model/GPU')} | {pair('kv/GPU')} | {pair('compute/GPU')} "
            f"| {pair('model/CPU')} | {pair('compute/CPU')} | {extra} |"
        )
    return out


def render(folder: Path) -> str:
    plans, entries, runs = load(folder)
    s = plans.get("settings", {})
    m = plans.get("machine", {})
    rounds = int(s.get("rounds", 3))
    ok = sum(1 for r in runs if not r["run"].get("error"))
    lines = [f"# GPU kit: {plans.get('device', '?')}, {plans.get('started', '?')}", ""]
    if s.get("dry"):
        lines += [
            "> **Dry run on a CPU machine**: every path but CUDA. The card sizes are scaled to",
            "> the small model, the runs ran on the CPU, and no figure here is a GPU figure.",
            "",
        ]
    staged = (plans.get("staged") or "").splitlines()
    lines += [
        f"- model: `{plans['model']['path']}` ({plans['model']['arch']}, "
        f"{plans['model']['n_layer']} layers); prompt {s.get('prompt')} tokens, "
        f"{s.get('gen')} decoded, context {s.get('ctx')} ({s.get('kv')} KV); "
        f"{rounds} rounds per block, alternating order",
        f"- machine: {m.get('cpu')}, {m.get('physical_cores')}/{m.get('logical_cores')} cores, "
        f"{m.get('ram_gib')} GiB RAM, RAM bandwidth {m.get('cpu_bandwidth_gbs')} GB/s "
        f"({m.get('cpu_bandwidth_source')}); GPU bandwidth {m.get('gpu_bandwidth_gbs')} GB/s, "
        f"PCIe {m.get('gpu_pcie')}; default threads {m.get('default_threads')}",
        f"- runs: {ok} measured, {len(runs) - ok} failed; speed model: the defaults "
        "(calibrated on the H200 data of 2026-11-27)",
    ]
    if staged:
        lines.append(f"- code: {'; '.join(staged[:3])}")
    if plans.get("fit_parser_check"):
        lines.append(f"- fit parser check: {plans['fit_parser_check']}")
    lines += ["", "## Targets (issue 11)", *targets(plans, entries)]
    lines += ["", "## Placements", *placements(plans, entries, rounds)]
    lines += bytes_table(entries)
    notes = [
        "",
        "## Notes",
        "",
        "- Ratios: the ratio of the two medians, and in brackets the worst and best pairing",
        "  of single runs. ⚠: fewer runs than rounds (time ran out, or a sweep placement that",
        "  did not fit its card was not repeated). `fits card`: NVML footprint ≤ the card",
        "  (a dry run: the planner's bytes within its own budget for that card).",
        "- Predicted decode at the bench's mean context (prompt + half the answer); predicted",
        "  prefill with uniform routing, and in brackets with the synthetic model's measured",
        "  expert coverage (`speed.H200_SYNTHETIC_COVERAGE`).",
    ]
    firsts = sum(e.first_runs for e in entries)
    if firsts:
        notes.append(
            f"- {firsts} run(s) were a worker's first (CUDA set-up inside that run's prefill)."
        )
    skipped = [e.name for e in entries if e.decode.n < rounds and e.cap is not None]
    if skipped:
        notes.append(f"- fewer than {rounds} runs: {', '.join(sorted(set(skipped)))}")
    return "\n".join(lines + notes) + "\n"


def write(folder: Path) -> Path:
    out = folder / "summary.md"
    out.write_text(render(folder))
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1])).read_text())
