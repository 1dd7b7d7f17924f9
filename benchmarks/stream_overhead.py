"""How close qwenrun's token stream comes to a bare loop of llama.cpp's native calls.

Three decoders run alternately on the same generated 151,936-token-vocabulary Qwen MoE, with
the same prompt and the same sampler settings:

- bare:    llama_sampler_sample, llama_token_to_piece, llama_decode on a one-token batch,
           nothing else (the yardstick);
- qwenrun: `Engine.generate(...)` iterated as the CLI iterates it;
- llama-cpp-python: `Llama.create_completion(stream=True)`, the high-level API.

Each run decodes a fixed number of tokens (the model is steered never to stop early) and
times the decode phase only (first sampled token to last). Reported: the median tok/s of
each and the median of the per-round ratios to the bare loop. llama.cpp's perf counters are
not the yardstick: they leave out part of its own work per token.

    python benchmarks/stream_overhead.py [--rounds 9] [--tokens 128]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from qwenrun.backend import Engine, SamplingParams, _llama
from qwenrun.placement import LoadConfig
from qwenrun.testing.tiny_gguf import QWEN_VOCAB_SIZE, write_model

PROMPT = (
    "<|im_start|>user\nWrite a short story about a lighthouse.<|im_end|>\n<|im_start|>assistant\n"
)
SAMPLING = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, seed=42)


def run_qwenrun(engine: Engine, prompt: list[int], n: int) -> float:
    engine.reset()
    gen = engine.generate(prompt, SAMPLING, max_tokens=n)
    t_first = 0.0
    for _piece in gen:
        if not t_first:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    assert gen.n_generated == n, gen.finish_reason
    return (gen.n_generated - 1) / (t_end - t_first)


def run_bare(engine: Engine, prompt: list[int], n: int) -> float:
    """The yardstick: only the three native calls per token."""
    lc = _llama()
    engine.reset()
    ctx, vocab = engine._ctx, engine._vocab
    chain = engine._sampler_chain(SAMPLING)
    arr = (lc.llama_token * len(prompt))(*prompt)
    lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(prompt)))
    tok_arr = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(tok_arr, 1)
    buf = ctypes.create_string_buffer(256)
    sample, to_piece, decode = lc.llama_sampler_sample, lc.llama_token_to_piece, lc.llama_decode
    t_first = 0.0
    for i in range(n):
        tok = sample(chain, ctx, -1)
        to_piece(vocab, tok, buf, 256, 0, False)
        if i == 0:
            t_first = time.perf_counter()
        if i == n - 1:
            break
        tok_arr[0] = tok
        decode(ctx, batch)
    t_end = time.perf_counter()
    lc.llama_sampler_free(chain)
    # The engine's cache bookkeeping no longer matches what the context holds.
    engine.reset()
    return (n - 1) / (t_end - t_first)


def run_high_level(llm: object, prompt_text: str, n: int) -> float:
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
    t_first = 0.0
    for _chunk in stream:
        if not t_first:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    # Chunks are not tokens (it holds back partial text), so count n tokens as asked.
    return (n - 1) / (t_end - t_first)


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

        results: dict[str, list[float]] = {"bare": [], "qwenrun": [], "llama-cpp-python": []}
        ratios: dict[str, list[float]] = {"qwenrun": [], "llama-cpp-python": []}
        run_qwenrun(engine, prompt, 16)  # warm-up: first-touch of pages, thread pools
        run_bare(engine, prompt, 16)
        for r in range(args.rounds):
            # Alternate the order so drift in machine speed hits all three alike.
            order = ["bare", "qwenrun", "llama-cpp-python"]
            if r % 2:
                order.reverse()
            got = {}
            for name in order:
                if name == "bare":
                    got[name] = run_bare(engine, prompt, args.tokens)
                elif name == "qwenrun":
                    got[name] = run_qwenrun(engine, prompt, args.tokens)
                else:
                    got[name] = run_high_level(llm, PROMPT, args.tokens)
            for name, v in got.items():
                results[name].append(v)
            for name in ratios:
                ratios[name].append(got[name] / got["bare"])
            print(
                f"round {r + 1}: "
                + "  ".join(f"{k} {v:7.1f} tok/s" for k, v in got.items())
                + f"  qwenrun/bare {ratios['qwenrun'][-1]:.3f}"
            )

        print()
        print(f"model: {path.name}, vocab {engine.meta.n_vocab}, {args.tokens} tokens per run")
        print(f"{'decoder':18} {'median tok/s':>12} {'ratio to bare (median, min-max)':>34}")
        for name, vals in results.items():
            if name == "bare":
                print(f"{name:18} {statistics.median(vals):12.1f} {'1.000':>34}")
                continue
            rs = ratios[name]
            spread = f"{statistics.median(rs):.3f} ({min(rs):.3f}-{max(rs):.3f})"
            print(f"{name:18} {statistics.median(vals):12.1f} {spread:>34}")
        engine.close()


if __name__ == "__main__":
    main()
