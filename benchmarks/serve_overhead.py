"""What `qwenrun serve` costs and what it saves.

1. Streaming overhead: decode tok/s that the official `openai` client sees through the
   server's SSE stream ÷ the engine's own stream (`Engine.generate`), on the same generated
   151,936-vocabulary MoE, the same prompt tokens (the chat template's rendering of the same
   message, thinking off) and the same sampler (top-k 20, top-p 0.8, temperature 0.7, seed
   42). The server runs as `qwenrun serve` in its own process; the engine stream runs in this
   one; they alternate, never overlap. Both speeds are tokens after the first over the time
   after the first (prefill excluded); the client's counts come from `usage`, because the
   server may put several tokens in one chunk when the client falls behind.
2. P9: time to first token of `qwenrun run MODEL PROMPT`, a fresh process that loads the
   model, vs `qwenrun run --server URL MODEL PROMPT` against a warm `qwenrun serve` (its
   second and later calls), both measured from process start to the first byte on stdout.

    python benchmarks/serve_overhead.py [--rounds 9] [--tokens 256] [--threads 1]
        [--p9-model PATH | --p9-layers 12] [--skip-p9] [--skip-stream]

`--p9-layers N` writes a synthetic Qwen3-30B-A3B Q4_K_M with N of its 48 blocks
(benchmarks/synthetic_model.py: real shapes and types, random weights) into --dir.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.engine.values import SamplingParams
from qwenrun.synthetic.tiny_gguf import QWEN_VOCAB_SIZE, write_model
from qwenrun.template import ChatTemplate

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse."}]
SAMPLING = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, seed=42)
ROOT = Path(__file__).resolve().parent.parent


class Serve:
    """`qwenrun serve` in a child process, until `close()`."""

    def __init__(self, model: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenrun", "serve", str(model), "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
            if "ready: " in line:
                break
        else:
            raise SystemExit("qwenrun serve did not start")

    def close(self) -> None:
        self.proc.send_signal(2)  # Ctrl-C: a clean stop
        self.proc.wait(60)


def engine_stream(engine: Engine, prompt: list[int], n: int) -> float:
    engine.reset()
    gen = engine.generate(prompt, SAMPLING, max_tokens=n)
    stamps = [time.perf_counter() for _piece in gen]
    assert gen.n_generated == n, gen.finish_reason
    return (n - 1) / (stamps[-1] - stamps[0])


def client_stream(client: openai.OpenAI, n: int) -> tuple[float, float]:
    """(tok/s the client saw, tok/s the server's engine reported for the same request)."""
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=n,
        temperature=SAMPLING.temperature,
        top_p=SAMPLING.top_p,
        seed=SAMPLING.seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": SAMPLING.top_k, "chat_template_kwargs": {"enable_thinking": False}},
    )
    first = last = 0.0
    generated = 0
    inside = 0.0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        timings = (chunk.model_extra or {}).get("timings")
        if timings:
            inside = float(timings["predicted_per_second"])
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
    assert generated == n, generated
    return (n - 1) / (last - first), inside


def streaming(args: argparse.Namespace, tmp: Path) -> None:
    path = write_model(tmp, "qwen3moe", n_layer=4, vocab_size=QWEN_VOCAB_SIZE, steer=2)
    load = LoadConfig(n_ctx=2048, n_threads=args.threads, prompt_cache=0)
    engine = Engine.load(path, load)
    template = ChatTemplate(engine.meta.chat_template or "")
    prompt = engine.tokenize(template.render(MESSAGES, enable_thinking=False))
    server = Serve(path, "--ctx", "2048", "--threads", str(args.threads), "--prompt-cache", "0")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    try:
        engine_stream(engine, prompt, 16)  # warm-up: pages, thread pools, connections
        client_stream(client, 16)
        ratios: list[float] = []
        inside: list[float] = []
        for r in range(args.rounds):
            order = ["engine", "client"] if r % 2 == 0 else ["client", "engine"]
            got: dict[str, float] = {}
            for name in order:
                if name == "engine":
                    got[name] = engine_stream(engine, prompt, args.tokens)
                else:
                    got[name], got["inside"] = client_stream(client, args.tokens)
            ratios.append(got["client"] / got["engine"])
            inside.append(got["inside"] / got["engine"])
            print(
                f"round {r + 1}: engine {got['engine']:7.1f} tok/s  "
                f"openai client via SSE {got['client']:7.1f} tok/s "
                f"(the server's engine said {got['inside']:7.1f})  ratio {ratios[-1]:.3f}"
            )
        print(
            f"\nstreaming: {args.tokens} tokens, {args.threads} thread(s), {args.rounds} rounds;"
            f" client/engine median {statistics.median(ratios):.3f}"
            f" (min {min(ratios):.3f}, max {max(ratios):.3f});"
            f" the server's own engine/engine median {statistics.median(inside):.3f}"
        )
    finally:
        server.close()
        engine.close()


def first_byte(cmd: list[str]) -> float:
    """Seconds from starting `cmd` to its first byte on stdout (or its exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    select.select([proc.stdout], [], [], 600)
    t = time.perf_counter() - t0
    proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return t


def p9(args: argparse.Namespace, tmp: Path) -> None:
    model = args.p9_model
    if model is None:
        model = Path(args.dir) / f"qwen3-30b-a3b-synth-{args.p9_layers}l-Q4_K_M.gguf"
        if not model.exists():
            script = ROOT / "benchmarks" / "synthetic_model.py"
            layers = ["--layers", str(args.p9_layers)]
            subprocess.run([sys.executable, str(script), *layers, "--out", str(model)], check=True)
    size = model.stat().st_size
    base = [sys.executable, "-m", "qwenrun", "run"]
    common = ["hello", "--max-tokens", "4", "--no-think", "--seed", "1"]
    local = [*base, str(model), *common, "--ctx", "2048", "--threads", str(args.threads)]
    server = Serve(model, "--ctx", "2048", "--threads", str(args.threads))
    remote = [*base, str(model), *common, "--server", server.url]
    try:
        first_byte(remote)  # the first call through the server (its cache is cold)
        times: dict[str, list[float]] = {"local": [], "server": []}
        for r in range(args.p9_rounds):
            order = ("local", "server") if r % 2 == 0 else ("server", "local")
            for name in order:
                times[name].append(first_byte(local if name == "local" else remote))
        print(f"\nP9: {model.name} ({size / 1e9:.2f} GB), {args.p9_rounds} rounds each")
        for name, values in times.items():
            print(
                f"  {name:7} time to first token: median {statistics.median(values):.2f} s"
                f" (min {min(values):.2f}, max {max(values):.2f})"
            )
        ratio = statistics.median(times["local"]) / statistics.median(times["server"])
        print(f"  a warm server answers {ratio:.1f}x sooner")
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--p9-model", type=Path)
    ap.add_argument("--p9-layers", type=int, default=12)
    ap.add_argument("--p9-rounds", type=int, default=5)
    ap.add_argument("--dir", default=str(ROOT / "build" / "models"))
    ap.add_argument("--skip-p9", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs · Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_stream:
            streaming(args, Path(tmp))
        if not args.skip_p9:
            p9(args, Path(tmp))


if __name__ == "__main__":
    main()
