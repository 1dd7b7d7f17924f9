"""A real `qwenrun serve` in this process, for tests: real llama.cpp behind the real server.

Contract: `serving(path, ...)` loads a GGUF through `Engine`, starts the OpenAI-compatible
server (`serve.server.Server`, uvicorn in a thread) on a free loopback port and yields a
`Running` (the served model, the server's state, its URL, the lines it logged, and an `openai`
client or `httpx` client for it); the server stops when the block ends. `prefilled(running,
text)` makes the model's answer begin with `text` for the length of a block: the engine
decodes it token by token (`Generation.force_text`) as if it had sampled it, which is how a
test gets a tool call out of random weights. Binds nothing but 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.serve.enginethread import Worker
from qwenrun.serve.runner import ServedModel
from qwenrun.serve.server import Server, bind
from qwenrun.serve.state import DEFAULT_MAX_BODY, ServerState

TIMEOUT = 120.0  # generous: a loaded 2-core machine


@dataclass
class Running:
    served: ServedModel
    state: ServerState
    url: str
    logs: list[str]

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT)


@contextmanager
def serving(
    path: Path,
    *,
    ctx: int = 1024,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_waiting: int = 8,
) -> Iterator[Running]:
    engine = Engine.load(path, LoadConfig(n_ctx=ctx, n_threads=1, prompt_cache=0))
    logs: list[str] = []
    state = ServerState(
        "tiny",
        Worker(max_waiting, log=logs.append),
        api_key=api_key,
        max_body=max_body,
        log=logs.append,
    )
    served = ServedModel.from_engine(engine, "tiny")
    state.ready(served)
    with Server(state, bind("127.0.0.1", 0)) as server:
        yield Running(served, state, server.url, logs)


@contextmanager
def prefilled(running: Running, text: str | None) -> Iterator[None]:
    """The model's answer begins with `text` (None: as it would) until the block ends."""
    running.served.answer_prefill = lambda _request: text
    try:
        yield
    finally:
        running.served.answer_prefill = None
