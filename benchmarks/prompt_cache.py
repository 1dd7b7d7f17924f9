"""What checkpoints and the disk prompt cache save: prompt tokens evaluated and time to first token.

Two measurements, each side by side in one run:

- P8, checkpoints: a 10-turn conversation with thinking on, driven as the REPL drives it
  (`chat.Conversation` + `chat.run_turn`, greedy), on the 151,936-vocab `qwen35moe` test
  model (a hybrid: its recurrent state cannot be trimmed, and each turn drops the previous
  answer's thinking from the history). Per turn: the new tokens (the prompt after what the
  context holds), the tokens evaluated, their ratio (target <= 1.05); then the time to first
  token of turn 10 with checkpoints and with them off (every turn a full re-evaluation), the
  median over rounds that alternate the order.
- The disk cache: two `qwenrun run --json` processes in a row with the same ~4,000-token
  document piped in and a different question after it, on a fresh QWENRUN_HOME each round;
  the second loads the document's state from disk. TTFT is the process's own figure (from
  the start of the turn to its first token: it includes reading and checking the entry, not
  the model load). Generated models big enough that prefill takes seconds on a CPU, a hybrid
  (`qwen35moe`) and an attention-only one (`qwen3moe`).

    python benchmarks/prompt_cache.py [--rounds 5] [--only p8|disk]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from qwenrun import chat
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.engine.values import GenStats
from qwenrun.synthetic.tiny_gguf import QWEN_VOCAB_SIZE, Dims, write_model
from qwenrun.testing.proc import run_qwenrun
from qwenrun.ui import render

QUESTIONS = (
    "Tell me a long story about a cat who lives in a lighthouse.",
    "And another one about a dog that learns to sail.",
    "Which of the two would make a better film, and why?",
    "Write a short poem about the sea at night.",
    "Now summarise everything so far in three sentences.",
    "What would the cat say to the dog if they met?",
    "Give me a recipe the sailor dog might cook on board.",
    "Explain how a lighthouse lens works, simply.",
    "List five names for a ship and what they mean.",
    "Finish with a moral that ties all the stories together.",
)


def quiet() -> render.PlainRenderer:
    return render.PlainRenderer(out=io.StringIO(), err=io.StringIO())


# ---- P8: checkpoints over a conversation


def conversation(path: Path, checkpoints: bool) -> list[tuple[GenStats, int, str]]:
    engine = Engine.load(path, LoadConfig(n_ctx=8192, prompt_cache=0))
    if not checkpoints:
        engine.checkpoints.max_count = 0
    try:
        conv = chat.Conversation.for_engine(
            engine, mode="think", settings={"temperature": 0, "max_tokens": 64}
        )
        turns = []
        for q in QUESTIONS:
            prepared = conv.prepare(engine, q)
            held = min(engine.common_prefix(prepared.tokens), len(prepared.tokens) - 1)
            result = chat.run_turn(engine, conv, quiet(), q)
            assert result.stats is not None and result.thinking
            said = result.thinking + "\x00" + result.answer
            turns.append((result.stats, len(prepared.tokens) - held, said))
        return turns
    finally:
        engine.close()


def p8(folder: Path, rounds: int) -> None:
    path = write_model(folder, "qwen35moe", steer=2, vocab_size=QWEN_VOCAB_SIZE)
    print(f"P8: {path.name}, 10 turns, thinking on, greedy, max 64 tokens a turn")
    ttft: dict[bool, list[float]] = {True: [], False: []}
    first: dict[bool, list[tuple[GenStats, int, str]]] = {}
    for r in range(rounds):
        for ck in (True, False) if r % 2 == 0 else (False, True):
            turns = conversation(path, ck)
            first.setdefault(ck, turns)
            ttft[ck].append(turns[-1][0].ttft_ms)
    print("| turn | prompt tokens | new | evaluated (checkpoints) | ratio | evaluated (off) |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for i, ((on, new, _), (off, _, _)) in enumerate(zip(first[True], first[False], strict=True), 1):
        ratio = on.eval_prompt_tokens / new
        if i > 1:
            worst = max(worst, ratio)
        print(
            f"| {i} | {on.prompt_tokens:,} | {new:,} | {on.eval_prompt_tokens:,}"
            f" ({on.reused_from or 'none'}) | {ratio:.3f} | {off.eval_prompt_tokens:,} |"
        )
    on_ms, off_ms = statistics.median(ttft[True]), statistics.median(ttft[False])
    print(f"worst ratio, turns 2-10: {worst:.3f} (target <= 1.05)")
    same = [t[2] for t in first[True]] == [t[2] for t in first[False]]
    print(f"thinking and answers the same with and without checkpoints: {same}")
    print(
        f"turn 10 TTFT, median of {rounds}: checkpoints {on_ms:.1f} ms"
        f" [{min(ttft[True]):.1f}-{max(ttft[True]):.1f}], full re-evaluation {off_ms:.1f} ms"
        f" [{min(ttft[False]):.1f}-{max(ttft[False]):.1f}]: {off_ms / on_ms:.1f}x"
    )


# ---- the disk cache across two processes

BIG = Dims(
    n_embd=512,
    n_head=8,
    n_head_kv=2,
    n_ff=1024,
    expert_ff=256,
    shexp_ff=256,
    ssm_state=32,
    ssm_v_heads=8,
)


def document(n_words: int) -> str:
    rng = random.Random(3)
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(n_words)
    )


def run_once(model: Path, doc: str, question: str, home: Path) -> dict[str, float]:
    proc = run_qwenrun(
        "run",
        str(model),
        "--json",
        "--no-think",
        "--max-tokens",
        "4",
        "--ctx",
        "8192",
        stdin=f"{doc}\n\n{question}\n",
        env={"QWENRUN_HOME": str(home)},
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)["stats"]


def disk(folder: Path, rounds: int) -> None:
    doc = document(620)  # about 4,000 tokens in the tiny vocabulary
    for arch in ("qwen35moe", "qwen3moe"):
        model = write_model(folder, arch, steer=2, n_layer=8, dims=BIG, name=f"bench-{arch}")
        size = model.stat().st_size / 1e6
        firsts, seconds, last = [], [], {}
        entry_mb = 0.0
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="qwenrun-bench-home-") as home:
                a = run_once(model, doc, "What is this about?", Path(home))
                b = run_once(model, doc, "Who wrote it, and when?", Path(home))
                entries = list((Path(home) / "prompt-cache").glob("*.qwrc"))
                entry_mb = sum(p.stat().st_size for p in entries) / 1e6
            firsts.append(a["ttft_ms"])
            seconds.append(b["ttft_ms"])
            last = {"first": a, "second": b}
        f, s = statistics.median(firsts), statistics.median(seconds)
        a, b = last["first"], last["second"]
        print(
            f"disk cache, {arch} ({size:.0f} MB model, 8 layers, n_embd 512):"
            f" first run {a['prompt_tokens']:,} tokens evaluated, TTFT {f:,.0f} ms"
            f" [{min(firsts):,.0f}-{max(firsts):,.0f}];"
            f" second run {b['eval_prompt_tokens']:,} evaluated, {b['reused_tokens']:,}"
            f" from {b['reused_from']}, TTFT {s:,.0f} ms [{min(seconds):,.0f}-{max(seconds):,.0f}]"
            f": {f / s:.1f}x; entry {entry_mb:.1f} MB"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=("p8", "disk"))
    args = ap.parse_args()
    print(time.strftime("%Y-%m-%d"), f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="qwenrun-bench-") as tmp:
        if args.only in (None, "p8"):
            p8(Path(tmp), args.rounds)
        if args.only in (None, "disk"):
            disk(Path(tmp), max(1, args.rounds // 2 + 1))


if __name__ == "__main__":
    main()
