"""What a hand-off to an RPC worker costs, on loopback: decode speed and one round trip.

Two `qwenrun worker`s serve their CPU on 127.0.0.1; a client process (the engine's own load
path, `qwenrun.testing.rpc_client`) decodes the same generated tiny `qwen3moe` (4 layers,
steered to never stop early) in four placements, alternated round by round (the order is
reversed every other round), each run a fresh process that loads the model and decodes:

- local:          every layer on this process's CPU;
- one worker:     every layer on worker A (llama.cpp keeps the input layer on the CPU);
- two workers:    layers 0-1 on A, layers 2-3 and the output layer on B;
- experts on A:   every layer here, the routed experts of every layer in A's RAM.

Per placement: decode tok/s (median and min-max over rounds), llama.cpp's graph splits (each
boundary between devices is a hand-off), and the cost of one hand-off: the extra time per
token over the local run of the same round, divided by the extra splits (median and min-max
over rounds). Separately, the round trip of one
ggml-rpc command (`rpc.round_trips`: GET_ALIGNMENT, which the worker answers without work, on
one connection after the HELLO): the floor of a hand-off, network and the worker's dispatch.
The tiny model's compute is microseconds, so the hand-offs are nearly all of the difference.
Beside each measured speed, the planner's prediction for the same placement (the speed model
of `planner/spreadspeed.py` with the workers' measured round trip; "experts on A" is not a
placement the planner makes, so it has none).

    python benchmarks/rpc_handoff.py [--rounds 9] [--tokens 128] [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from qwenrun.engine import rpc
from qwenrun.synthetic.tiny_gguf import write_model
from qwenrun.testing.workers import WorkerProcess, run_client, start_worker


def placements(a: WorkerProcess, b: WorkerProcess) -> dict[str, dict[str, Any]]:
    both = f"{a.endpoint},{b.endpoint}"
    return {
        "local": {},
        "one worker": {"workers": a.endpoint, "blocks": [[a.buffer(), 4]]},
        "two workers": {"workers": both, "blocks": [[a.buffer(), 2], [b.buffer(), 2]]},
        "experts on A": {
            "workers": a.endpoint,
            "blocks": [["CPU", 4]],
            "homes": [[a.buffer(), [0, 1, 2, 3]]],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", default="1", help="threads of the client and of each worker")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="rpc-handoff-"))
    model = str(write_model(folder, "qwen3moe", n_layer=4, steer=2))
    a = start_worker("--threads", args.threads, "--no-cache")
    b = start_worker("--threads", args.threads, "--no-cache")
    try:
        rtt = rpc.round_trips(a.endpoint, args.calls)
        configs = placements(a, b)
        predicted = predictions(model, a, b, int(args.threads))
        speeds: dict[str, list[float]] = {name: [] for name in configs}
        splits: dict[str, int] = {}
        texts: dict[str, str] = {}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                proc = run_client(
                    model=model, tokens=args.tokens, threads=args.threads, **configs[name]
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: {proc.stderr.strip()}")
                out = json.loads(proc.stdout)
                (run,) = out["runs"]
                assert run["tokens"] == args.tokens, run
                speeds[name].append(run["decode_tok_s"])
                splits[name] = out["graph_splits"]
                texts[name] = out["text"]
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(folder, ignore_errors=True)
    same = len(set(texts.values())) == 1
    report(args, speeds, splits, rtt, same, predicted)


def predictions(model: str, a: WorkerProcess, b: WorkerProcess, threads: int) -> dict[str, float]:
    """The speed model's decode tok/s for the placements the planner can make."""
    from dataclasses import replace

    from qwenrun import hwprobe, machine
    from qwenrun.hub.header import read_local
    from qwenrun.planner import speed, spreadspeed
    from qwenrun.planner.budget import Budget
    from qwenrun.planner.costs import Layout, Spread, Stage, usage
    from qwenrun.planner.facts import ModelFacts

    facts = ModelFacts.from_info(read_local(model))
    hw = hwprobe.probe()
    hw = replace(hw, workers=machine.workers([a.endpoint, b.endpoint]))
    targets = Budget.from_hw(hw).targets
    ram = {t.machine: i for i, t in enumerate(targets) if t.is_ram}
    params = speed.params_for(hw)
    ctx = speed.PLAN_CONTEXT_TOKENS
    one = Layout(n_ctx=1024, use_gpu=False, n_gpu_layers=0)
    local = speed.predict(facts, one, usage(facts, one), hw, False, threads).decode_tok_s
    out = {"local": local}
    for name, stages in (
        ("one worker", (Stage(ram[a.endpoint], 4),)),
        ("two workers", (Stage(ram[a.endpoint], 2), Stage(ram[b.endpoint], 2))),
    ):
        lay = Layout(n_ctx=1024, spread=Spread(targets, 0, stages))
        t = spreadspeed.decode_seconds(facts, lay, hw, params, ctx, threads)
        out[name] = 1.0 / t
    return out


def report(
    args: argparse.Namespace,
    speeds: dict[str, list[float]],
    splits: dict[str, int],
    rtt: list[float],
    same_text: bool,
    predicted: dict[str, float],
) -> None:
    print()
    print(f"rounds {args.rounds}, {args.tokens} tokens per run, threads {args.threads}")
    print(
        "| placement | tok/s: median (min-max) | predicted tok/s | ms/token | graph splits "
        "| ms per extra split: median (min-max) |"
    )
    print("|---|---|---|---|---|---|")
    for name, values in speeds.items():
        med = statistics.median(values)
        extra = splits[name] - splits["local"]
        # Paired with the local run of the same round: the machine's mood moves both.
        per = [
            (1000 / v - 1000 / local) / extra
            for v, local in zip(values, speeds["local"], strict=True)
            if extra > 0
        ]
        cost = f"{statistics.median(per):.3f} ({min(per):.3f}-{max(per):.3f})" if per else "—"
        guess = f"{predicted[name]:.0f}" if name in predicted else "—"
        print(
            f"| {name} | {med:.0f} ({min(values):.0f}-{max(values):.0f}) | {guess} | "
            f"{1000 / med:.3f} | {splits[name]} | {cost} |"
        )
    us = sorted(t * 1e6 for t in rtt)
    q = statistics.quantiles(us, n=10)
    print()
    print(
        f"one ggml-rpc round trip (GET_ALIGNMENT, {len(us)} calls): "
        f"median {statistics.median(us):.1f} µs, p10 {q[0]:.1f} µs, p90 {q[-1]:.1f} µs"
    )
    print(f"same greedy text in every placement: {'yes' if same_text else 'NO'}")


if __name__ == "__main__":
    main()
