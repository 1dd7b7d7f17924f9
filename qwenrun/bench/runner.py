"""Measuring placements the way a careful engineer would: repeated, alternated, warmed up.

Contract: `run_bench(path, candidates, settings)` loads the model once per candidate and
round, in an order that alternates (ABC, then CBA, then ABC …) so that a drift of the machine
(heat, page cache, another program) falls on every candidate alike; each load decodes a few
tokens to warm up, then evaluates a fixed prompt of `prompt_tokens` and decodes exactly
`gen_tokens` (greedy, end-of-generation ruled out), and keeps llama.cpp's numbers as one
`Run`. A candidate that fails to load (out of memory) is recorded with its error and the
bench goes on. `summarize` gives each candidate's median and spread. Progress goes to the
caller's callback (before each run, and with each finished `Run`); nothing here prints or
stores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwenrun import errors
from qwenrun.bench.candidates import Candidate
from qwenrun.engine.llama import Engine
from qwenrun.engine.values import SamplingParams

# A fixed text, repeated to the prompt length: the same tokens for every candidate and run.
_PROMPT_TEXT = (
    "A mixture-of-experts model holds many small feed-forward networks in each layer and "
    "routes every token to a few of them. The placement of those experts between the GPU "
    "and system memory decides how fast the model runs on a given machine. "
)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    rounds: int = 3
    warmup_tokens: int = 8

    def validate(self) -> None:
        if self.rounds < 1:
            raise errors.UsageError("--rounds must be 1 or more")
        if self.prompt_tokens < 1 or self.gen_tokens < 2:
            raise errors.UsageError(
                "--prompt must be 1 or more tokens and --gen 2 or more",
                hint="decode speed is measured between the first and the last generated token",
            )


@dataclass(frozen=True)
class Run:
    """One measured load of one candidate."""

    candidate: int  # index into the candidates
    round: int
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    ttft_ms: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    load_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Summary:
    candidate: int
    runs: int
    decode_median: float
    decode_min: float
    decode_max: float
    prefill_median: float
    prefill_min: float
    prefill_max: float
    failed: int = 0

    @property
    def decode_spread(self) -> float:
        """Max − min over median: how much single runs of this placement disagree."""
        return (
            (self.decode_max - self.decode_min) / self.decode_median if self.decode_median else 0.0
        )


# done, total, what runs next ("done" at the end), the run that just finished (None first)
Progress = Callable[[int, int, str, Run | None], None]


def bench_prompt(engine: Engine, n_tokens: int) -> list[int]:
    """`n_tokens` tokens of the fixed text (the context must hold them plus the answer)."""
    tokens: list[int] = []
    piece = engine.tokenize(_PROMPT_TEXT, special=False)
    while len(tokens) < n_tokens:
        tokens.extend(piece)
    return tokens[:n_tokens]


def schedule(n_candidates: int, rounds: int) -> list[tuple[int, int]]:
    """(round, candidate) in the order they run: forward, backward, forward …"""
    order: list[tuple[int, int]] = []
    for r in range(rounds):
        seq = range(n_candidates) if r % 2 == 0 else range(n_candidates - 1, -1, -1)
        order.extend((r, c) for c in seq)
    return order


def measure_once(path: Path, cand: Candidate, index: int, rnd: int, s: BenchSettings) -> Run:
    """Load, warm up, measure, close: one run of one candidate."""
    t0 = time.perf_counter()
    try:
        engine = Engine.load(path, cand.load)
    except errors.QwenrunError as err:
        return Run(index, rnd, error=err.message)
    load_s = time.perf_counter() - t0
    try:
        if s.prompt_tokens + s.gen_tokens >= engine.n_ctx:
            raise errors.UsageError(
                f"--prompt {s.prompt_tokens} + --gen {s.gen_tokens} tokens do not fit the "
                f"context of {engine.n_ctx}",
                hint="lower them, or raise --ctx",
            )
        greedy = SamplingParams(temperature=0.0, ban_eog=True)
        # Warm-up: first-use costs (lazy kernel loading, page faults) are not the speed.
        warm = engine.generate(bench_prompt(engine, 16), greedy, max_tokens=s.warmup_tokens)
        warm.text()
        engine.reset()
        gen = engine.generate(bench_prompt(engine, s.prompt_tokens), greedy, s.gen_tokens)
        gen.text()
        stats = gen.stats
        assert stats is not None
        return Run(
            index,
            rnd,
            prefill_tok_s=stats.prefill_tok_s,
            decode_tok_s=stats.decode_tok_s,
            ttft_ms=stats.ttft_ms,
            prompt_tokens=stats.eval_prompt_tokens,
            generated_tokens=stats.generated_tokens,
            load_s=load_s,
        )
    finally:
        engine.close()


def run_bench(
    path: Path,
    cands: Sequence[Candidate],
    settings: BenchSettings,
    on_progress: Progress | None = None,
) -> list[Run]:
    settings.validate()
    order = schedule(len(cands), settings.rounds)
    runs: list[Run] = []
    for done, (rnd, index) in enumerate(order):
        if on_progress is not None:
            what = f"round {rnd + 1}: {cands[index].label}"
            on_progress(done, len(order), what, runs[-1] if runs else None)
        runs.append(measure_once(path, cands[index], index, rnd, settings))
    if on_progress is not None:
        on_progress(len(order), len(order), "done", runs[-1] if runs else None)
    return runs


def summarize(runs: Sequence[Run], n_candidates: int) -> list[Summary]:
    out = []
    for c in range(n_candidates):
        ok = [r for r in runs if r.candidate == c and r.ok]
        failed = sum(1 for r in runs if r.candidate == c and not r.ok)
        if not ok:
            out.append(Summary(c, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, failed))
            continue
        dec = [r.decode_tok_s for r in ok]
        pre = [r.prefill_tok_s for r in ok]
        out.append(
            Summary(
                c,
                len(ok),
                statistics.median(dec),
                min(dec),
                max(dec),
                statistics.median(pre),
                min(pre),
                max(pre),
                failed,
            )
        )
    return out
