"""Time of the tool-call parser on long inputs fed a few characters at a time (issue 20).

Each shape is text the engine could stream into `serve.toolcalls.ToolCallParser`: 40,000
characters (by default) fed 4 at a time, as tokens arrive, then `finish()`. A parser that
re-scans its buffer from the start on each feed takes time quadratic in the length; one that
only looks at what is new takes time linear in it. The first five shapes are those issue 20
measured as quadratic; the rest are controls (a long value, plain prose, a long call that
completes, a whole answer of calls). Then the same for the thinking router that every server
request runs first (`serve.answer_router.AnswerRouter`, with tools: it holds back whitespace
inside thinking until `</think>` or more text says where it goes).

    python benchmarks/toolcall_parse.py                 # 40,000 characters, median of 3 rounds
    python benchmarks/toolcall_parse.py --chars 80000   # twice as long: linear time doubles
    git show HEAD:qwenrun/serve/toolcalls.py > /tmp/old_toolcalls.py
    python benchmarks/toolcall_parse.py --parser-file /tmp/old_toolcalls.py   # another version
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from qwenrun.serve import toolcalls

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
]

CALL_HEAD = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>"


def _repeat(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


# name → the text for a given length. The first five are issue 20's quadratic shapes.
SHAPES: dict[str, Callable[[int], str]] = {
    "json name never closes": lambda n: '<tool_call>\n{"name": "' + "a" * n,
    "whitespace after <tool_call>": lambda n: "<tool_call>" + _repeat(" \n", n),
    "whitespace between parameters": lambda n: CALL_HEAD + _repeat(" \n", n),
    "whitespace after </function>": lambda n: CALL_HEAD + "\n</function>" + _repeat(" \n", n),
    "whitespace-only answer": lambda n: _repeat(" \n", n),
    "unfinished string value (control)": lambda n: (
        "<tool_call>\n<function=write_file>\n<parameter=content>\n" + _repeat("x = 1  # <b>\n", n)
    ),
    "plain prose (control)": lambda n: _repeat("The weather in <b>Paris</b> is fine. ", n),
    "long call, completed (control)": lambda n: (
        "<tool_call>\n<function=write_file>\n"
        "<parameter=content>\n"
        + _repeat("if end == '</parameter>':\n    pass\n", n)
        + "\n</parameter>\n</function>\n</tool_call>"
    ),
    "many small calls (control)": lambda n: _repeat(
        CALL_HEAD + "\n</function>\n</tool_call>\nThen ", n
    ),
}


def time_shape(parser_class: Any, text: str, step: int) -> float:
    parser = parser_class(TOOLS)
    t0 = time.perf_counter()
    for i in range(0, len(text), step):
        parser.feed(text[i : i + step])
    parser.finish()
    return time.perf_counter() - t0


# The thinking router, fed what a model writes inside its thinking.
ROUTER_SHAPES: dict[str, Callable[[int], str]] = {
    "whitespace in thinking (router)": lambda n: "a" + _repeat(" \n", n) + "b</think>ok",
    "prose in thinking (router, control)": lambda n: _repeat("I think so. ", n) + "</think>",
}


def time_router(text: str, step: int) -> float:
    from qwenrun.serve.answer_router import AnswerRouter

    router = AnswerRouter(opened=True, divert_tool_calls=True)
    t0 = time.perf_counter()
    for i in range(0, len(text), step):
        router.feed(text[i : i + step])
    router.flush()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=40_000, help="length of each input")
    ap.add_argument("--step", type=int, default=4, help="characters per feed")
    ap.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    ap.add_argument(
        "--parser-file",
        help="time the ToolCallParser of this file instead (e.g. an earlier version from git)",
    )
    args = ap.parse_args()
    parser_class = toolcalls.ToolCallParser
    source = "qwenrun.serve.toolcalls"
    if args.parser_file:
        spec = importlib.util.spec_from_file_location("toolcalls_under_test", args.parser_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (its dataclasses look their module up)
        spec.loader.exec_module(module)
        parser_class, source = module.ToolCallParser, args.parser_file
    print(
        f"# {source}; {platform.python_implementation()} {platform.python_version()}, "
        f"{args.chars:,} characters fed {args.step} at a time, median of {args.rounds}"
    )
    print(f"{'shape':<38} {'seconds':>9}")
    for name, make in SHAPES.items():
        text = make(args.chars)
        runs = [time_shape(parser_class, text, args.step) for _ in range(args.rounds)]
        print(f"{name:<38} {statistics.median(runs):>9.3f}")
    for name, make in ROUTER_SHAPES.items():
        text = make(args.chars)
        runs = [time_router(text, args.step) for _ in range(args.rounds)]
        print(f"{name:<38} {statistics.median(runs):>9.3f}")


if __name__ == "__main__":
    main()
