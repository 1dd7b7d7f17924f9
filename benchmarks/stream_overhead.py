"""How close qwenrun's token stream comes to a bare loop of llama.cpp's native calls.

Three decoders run alternately on the same generated 151,936-token-vocabulary Qwen MoE, with
the same prompt and the same sampler settings:

- bare:    llama_sampler_sample, llama_token_to_piece, llama_decode on a one-token batch,
           nothing else (the yardstick);
- qwenrun: `Engine.generate(...)` iterated as the CLI iterates it;
- llama-cpp-python: `Llama.create_completion(stream=True)`, the high-level API.

Each run decodes a fixed number of tokens (the model is steered never to stop early) and
stamps the time of every token. Two speeds per run: over the whole decode (wall), and from
the median gap between tokens (steady: robust to the bursts of stolen time a shared VM has).
Reported: the median over rounds of each decoder's ratio to the bare loop of the same round.
llama.cpp's perf counters are not the yardstick: they leave out part of its own work per token.

    python benchmarks/stream_overhead.py [--rounds 9] [--tokens 128]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.engine.native import bindings
from qwenrun.engine.values import SamplingParams
from qwenrun.synthetic.tiny_gguf import QWEN_VOCAB_SIZE, write_model

PROMPT = (
    "<|im_start|>user\nWrite a short story about a lighthouse.<|im_end|>\n<|im_start|>assistant\n"
)
SAMPLING = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, seed=42)


def run_qwenrun(engine: Engine, prompt: list[int], n: int) -> list[float]:
    engine.reset()
    gen = engine.generate(prompt, SAMPLING, max_tokens=n)
    stamps = []
    for _piece in gen:
        stamps.append(time.perf_counter())
    assert gen.n_generated == n, gen.finish_reason
    return stamps


def run_bare(engine: Engine, prompt: list[int], n: int) -> list[float]:
    """The yardstick: only the three native calls per token."""
    lc = bindings()
    engine.reset()
    ctx, vocab = engine._ctx, engine._vocab
    chain = engine._sampler_chain(SAMPLING)
    arr = (lc.llama_token * len(prompt))(*prompt)
    lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(prompt)))
    tok_arr = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(tok_arr, 1)
    buf = ctypes.create_string_buffer(256)
    sample, to_piece, decode = lc.llama_sampler_sample, lc.llama_token_to_piece, lc.llama_decode
    stamps = []
    for i in range(n):
        tok = sample(chain, ctx, -1)
        to_piece(vocab, tok, buf, 256, 0, False)
        stamps.append(time.perf_counter())
        if i == n - 1:
            break
        tok_arr[0] = tok
        decode(ctx, batch)
    lc.llama_sampler_free(chain)
    # The engine's cache bookkeeping no longer matches what the context holds.
    engine.reset()
    return stamps


def run_high_level(llm: object, prompt_text: str, n: int) -> list[float]:
    llm.reset()  # type: ignore[attr-defined]
    stream = llm.create_completion(  # type: ignore[attr-defined]
        prompt_text,
        max_tokens=n,
        temperature=SAMPLING.temperature,
        top_k=SAMPLING.top_k,
        top_p=SAMPLING.top_p,
        min_p=SAMPLING.min_p,
        repeat_penalty=1.0,
        seed=SAMPLING.seed,
        stream=True,
    )
    # ASCII-only output (the model is steered so): one chunk per token.
    return [time.perf_counter() for _chunk in stream]


def speeds(stamps: list[float]) -> tuple[float, float]:
    """(tok/s over the whole decode, tok/s from the median gap between tokens).

    The median gap is robust to the bursts of stolen time a shared 2-core VM has; the wall
    figure is what a user sees. Both exclude prefill (timing starts at the first token).
    """
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return (len(gaps) / (stamps[-1] - stamps[0]), 1.0 / statistics.median(gaps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, help="an existing GGUF instead of the generated one")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_model(
            tmp, "qwen3moe", n_layer=4, vocab_size=QWEN_VOCAB_SIZE, steer=2
        )
        load = LoadConfig(n_ctx=1024, n_threads=args.threads)
        engine = Engine.load(path, load)
        prompt = engine.tokenize(PROMPT)

        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=1024, n_threads=args.threads, verbose=False
        )

        names = ("bare", "qwenrun", "llama-cpp-python")
        wall: dict[str, list[float]] = {k: [] for k in names}
        steady: dict[str, list[float]] = {k: [] for k in names}
        run_qwenrun(engine, prompt, 16)  # warm-up: first-touch of pages, thread pools
        run_bare(engine, prompt, 16)
        for r in range(args.rounds):
            # Alternate the order so drift in machine speed hits all three alike.
            order = ["bare", "qwenrun", "llama-cpp-python"]
            if r % 2:
                order.reverse()
            got: dict[str, tuple[float, float]] = {}
            for name in order:
                if name == "bare":
                    stamps = run_bare(engine, prompt, args.tokens)
                elif name == "qwenrun":
                    stamps = run_qwenrun(engine, prompt, args.tokens)
                else:
                    stamps = run_high_level(llm, PROMPT, args.tokens)
                got[name] = speeds(stamps)
            for name, (w, st) in got.items():
                wall[name].append(w / got["bare"][0])
                steady[name].append(st / got["bare"][1])
            print(
                f"round {r + 1}: "
                + "  ".join(f"{k} {w:6.1f}/{st:6.1f}" for k, (w, st) in got.items())
                + "  tok/s (wall/median gap)"
            )

        print()
        print(f"model: {path.name}, vocab {engine.meta.n_vocab}, {args.tokens} tokens per run")
        print("ratio to the bare loop, median over rounds (min-max):")
        print(f"{'decoder':18} {'by median gap (steady)':>28} {'by wall time':>26}")
        for name in names:
            cols = [
                f"{statistics.median(v[name]):.3f} ({min(v[name]):.3f}-{max(v[name]):.3f})"
                for v in (steady, wall)
            ]
            print(f"{name:18} {cols[0]:>28} {cols[1]:>26}")
        engine.close()


if __name__ == "__main__":
    main()
