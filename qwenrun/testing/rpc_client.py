"""A client of `qwenrun worker`s for tests and benchmarks: load a model over them, answer, report.

Contract: `python -m qwenrun.testing.rpc_client --model PATH [options]` runs under
`engine.crash.supervise`, as `qwenrun` does, and goes through the engine's own path: a
`Placement` with the given workers, layer blocks (`Placement.layer_blocks`) and expert homes,
`Engine.load`, then greedy generation (seed 1). It prints one JSON object on stdout: the text,
the decode speed of each run, llama.cpp's buffers and overridden tensors, the devices llama.cpp
had, how many pieces llama.cpp's scheduler cut the graph into (each boundary between
devices is a hand-off), and whether the engine's connections to the workers have TCP
keepalive on. A
`QwenrunError` is one `error:` line, as `qwenrun` would say it, and exit status 7 for a
`WorkerError` (cli's), 1 for the others.

Options: `--workers a:1,b:2`; `--blocks '[["CPU",1],["RPC0[a:1]",3]]'`; `--homes
'[["RPC0[a:1]",[2,3]]]'`; `--tokens N`; `--runs N` (answers on the one loaded model);
`--prompt TEXT`; `--ctx N`; `--threads N`; `--progress` (a line on stderr per token);
`--pause-file PATH` (after registering the workers, say `paused` on stderr and wait until
PATH exists: a test can kill a worker meanwhile); `--then-abort` (after the pause, die by
SIGABRT without ggml, as an abort llama.cpp's hook does not see would).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

# llama.cpp's scheduler: "sched_reserve: graph: nodes = 210, splits = 1, ..."
_SPLITS = re.compile(r"sched_reserve: graph: nodes = \d+, splits = (\d+)")


def _options(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rpc_client")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", default="")
    ap.add_argument("--blocks", type=json.loads, default=None)
    ap.add_argument("--homes", type=json.loads, default=[])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--prompt", default="The workers answer")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--pause-file", default=None)
    ap.add_argument("--then-abort", action="store_true")
    return ap.parse_args(argv)


def _keepalive(endpoints: tuple[str, ...]) -> list[bool]:
    import psutil

    wanted = {(h, int(p)) for h, p in (e.rsplit(":", 1) for e in endpoints)}
    found = []
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.fd >= 0 and conn.raddr and (conn.raddr.ip, conn.raddr.port) in wanted:
            with socket.socket(fileno=os.dup(conn.fd)) as s:
                found.append(bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)))
    return found


def _client(opts: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from qwenrun.engine import devices, rpc
    from qwenrun.engine.llama import Engine
    from qwenrun.engine.loadconfig import ExpertHome, LoadConfig, Placement
    from qwenrun.engine.values import SamplingParams

    workers = rpc.parse_endpoints(opts.workers)
    if opts.pause_file:
        rpc.connect(workers)
        print("paused", file=sys.stderr, flush=True)
        while not Path(opts.pause_file).exists():
            time.sleep(0.02)
        if opts.then_abort:
            os.abort()
    homes = tuple(ExpertHome(buf, layers=tuple(layers)) for buf, layers in opts.homes)
    if opts.blocks is not None:
        n_layer = sum(n for _, n in opts.blocks)
        placement = Placement.layer_blocks(
            n_layer, [tuple(b) for b in opts.blocks], rpc_workers=workers, expert_homes=homes
        )
    else:
        placement = Placement(rpc_workers=workers, expert_homes=homes)
    config = LoadConfig(n_ctx=opts.ctx, n_threads=opts.threads, prompt_cache=0, placement=placement)
    runs = []
    with Engine.load(opts.model, config) as engine:
        keepalive = _keepalive(workers)
        prompt = engine.tokenize(opts.prompt)
        text = ""
        for _ in range(opts.runs):
            gen = engine.generate(
                prompt, SamplingParams(temperature=0.0, seed=1), max_tokens=opts.tokens
            )
            pieces = []
            for i, piece in enumerate(gen):
                pieces.append(piece)
                if opts.progress:
                    print(f"token {i}", file=sys.stderr, flush=True)
            text = "".join(pieces)
            assert gen.stats is not None
            runs.append(
                {"decode_tok_s": gen.stats.decode_tok_s, "tokens": gen.stats.generated_tokens}
            )
        report = engine.placement
        splits = [m.group(1) for ln in engine.log_lines if (m := _SPLITS.search(ln))]
    return {
        "text": text,
        "runs": runs,
        "buffers": [asdict(b) for b in report.buffers],
        "overridden": [list(t) for t in report.overridden_tensors],
        "devices": [asdict(d) for d in devices.list_devices()],
        "layer_devices": placement.layer_devices(engine.meta.n_layer),
        "keepalive": keepalive,
        "graph_splits": int(splits[-1]) if splits else None,
    }


def main(argv: list[str] | None = None) -> None:
    from qwenrun import errors
    from qwenrun.engine import rpc

    opts = _options(argv)
    try:
        print(json.dumps(_client(opts)), flush=True)
    except errors.QwenrunError as err:
        line = f"error: {err.message}" + (f" (hint: {err.hint})" if err.hint else "")
        print(line, file=sys.stderr, flush=True)
        # cli's status for a worker's error (nothing imports cli); 1 for the rest
        sys.exit(rpc.LOST_EXIT_CODE if isinstance(err, errors.WorkerError) else 1)


if __name__ == "__main__":
    from qwenrun.engine import crash

    crash.supervise(main)
