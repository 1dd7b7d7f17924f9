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
    report(args, speeds, splits, rtt, same)


def report(
    args: argparse.Namespace,
    speeds: dict[str, list[float]],
    splits: dict[str, int],
    rtt: list[float],
    same_text: bool,
) -> None:
    print()
    print(f"rounds {args.rounds}, {args.tokens} tokens per run, threads {args.threads}")
    print(
        "| placement | tok/s: median (min-max) | ms/token | graph splits "
        "| ms per extra split: median (min-max) |"
    )
    print("|---|---|---|---|---|")
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
        print(
            f"| {name} | {med:.0f} ({min(values):.0f}-{max(values):.0f}) | {1000 / med:.3f} | "
            f"{splits[name]} | {cost} |"
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
