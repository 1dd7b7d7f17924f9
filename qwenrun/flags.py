"""The options the commands share, declared once: where the model goes, how it starts, how
to talk to it.

Contract: typer declarations as frozen dataclasses, one field per option. `PlaceFlags` is the
planner's constraints (`offload.Wishes`, built by `wishes()`), which `run`, `chat`, `serve`,
`bench` and `plan` take alike; `LoadFlags` is start-up behaviour (verbosity, questions, the
prompt cache on disk); `ChatFlags` is mode, thinking, system prompt and effort, with one
option per row of the sampling table (`sampling.SETTINGS`), checked against its ranges before
anything loads. `with_flags` gives a command the options of the groups its signature asks for
(`place: PlaceFlags`, …) and hands it one value per group. `SERVER` is `run`/`chat`'s
`--server`. Nothing here reads the machine or imports llama_cpp.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import typer

from qwenrun import sampling

if TYPE_CHECKING:
    from qwenrun.offload import Wishes


# `run` and `chat`: a `qwenrun serve` to use instead of loading the model here.
SERVER = typer.Option(
    None,
    "--server",
    envvar="QWENRUN_SERVER",
    help="Use the model of this qwenrun serve (URL, or $QWENRUN_SERVER) instead of loading it.",
)


@dataclass(frozen=True)
class PlaceFlags:
    """Where the model goes: the planner's constraints (`offload.Wishes`). `run`, `chat`,
    `serve`, `bench` and `plan` take exactly these."""

    ctx: int | None = typer.Option(None, "--ctx", help="Context size in tokens (default: planned).")
    kv_type: str | None = typer.Option(
        None, "--kv-type", help="KV cache type: f16 (default), q8_0, q4_0."
    )
    cpu_moe: bool = typer.Option(
        False, "--cpu-moe", help="Every layer's routed experts on the CPU."
    )
    n_cpu_moe: int | None = typer.Option(
        None, "--n-cpu-moe", help="Routed experts of the first N layers on the CPU."
    )
    cpu_moe_from: str | None = typer.Option(
        None,
        "--cpu-moe-from",
        help="Which layers' experts go to the CPU: last (default, as llama.cpp's --fit) or first.",
    )
    gpu_layers: int | None = typer.Option(
        None, "--gpu-layers", help="Layers on the GPU (default: all)."
    )
    ngram_table: str | None = typer.Option(
        None,
        "--ngram-table",
        help="Qwen3.8-Flash-Next's n-gram table: ram (read at load) or disk (rows read as "
        "needed). Default: RAM when it fits beside everything else.",
    )
    prefer: str = typer.Option(
        "balanced",
        "--prefer",
        help="Quant choice: quality (best that fits), balanced (default) or speed.",
    )
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads (default: physical cores)."
    )
    rpc: str | None = typer.Option(
        None,
        "--rpc",
        envvar="QWENRUN_RPC",
        help="Also use these qwenrun workers' GPUs and RAM: HOST:PORT[,HOST:PORT…].",
    )

    def wishes(self, **more: Any) -> Wishes:
        """The planner's `Wishes` from these flags (and a command's own, `more`)."""
        from qwenrun.engine.rpc import parse_endpoints
        from qwenrun.offload import Wishes

        return Wishes(
            rpc=parse_endpoints(self.rpc) if self.rpc else (),
            n_ctx=self.ctx,
            kv_type=self.kv_type,
            cpu_moe=self.cpu_moe,
            n_cpu_moe=self.n_cpu_moe,
            cpu_moe_from=self.cpu_moe_from,  # type: ignore[arg-type]  # Wishes.validate checks
            n_gpu_layers=self.gpu_layers,
            ngram_table=self.ngram_table,  # type: ignore[arg-type]  # Wishes.validate checks
            threads=self.threads,
            prefer=self.prefer,  # type: ignore[arg-type]  # Wishes.validate checks
            **more,
        )


@dataclass(frozen=True)
class LoadFlags:
    """How to start: what is shown and asked, and the prompt cache on disk."""

    verbose: bool = typer.Option(False, "--verbose", help="Stats and llama.cpp's log on stderr.")
    yes: bool = typer.Option(False, "--yes", "-y", help="Download a missing model without asking.")
    prompt_cache: str | None = typer.Option(
        None,
        "--prompt-cache",
        help="Cap of the prompt cache on disk (default 4GiB or $QWENRUN_PROMPT_CACHE; 0: off).",
    )

    def prompt_cache_bytes(self) -> int:
        """The disk prompt cache's cap: the flag, else QWENRUN_PROMPT_CACHE, else 4 GiB."""
        from qwenrun.engine import promptcache

        if self.prompt_cache is None:
            return promptcache.cap_from_env()
        return promptcache.parse_cap(self.prompt_cache, "--prompt-cache")


def _sampling_options(cls: type) -> type:
    """Give a flag group one option per row of the sampling table (`sampling.SETTINGS`):
    `--KEY`, a number or None (not given), with the table's help. Applied before
    `@dataclass`, so they are fields like the hand-written ones."""
    for s in sampling.SETTINGS:
        cls.__annotations__[s.attr] = f"{s.kind.__name__} | None"
        setattr(cls, s.attr, typer.Option(None, s.flag, help=s.help))
    return cls


@dataclass(frozen=True)
@_sampling_options
class ChatFlags:
    """How to talk: mode, thinking, system prompt; the sampling options come from the table."""

    think: bool | None = typer.Option(
        None, "--think/--no-think", help="Thinking or direct mode (default: the model's)."
    )
    show_thinking: bool = typer.Option(
        False,
        "--show-thinking/--hide-thinking",
        help="Keep thinking on screen, not folded (piped: on stderr, never on stdout).",
    )
    system: str | None = typer.Option(None, "--system", help="The system prompt.")
    effort: str | None = typer.Option(
        None, "--effort", help="Reasoning effort (Qwen3.8-Flash-Next: xhigh, medium, low)."
    )

    def settings(self) -> dict[str, int | float]:
        """The sampling table's options that were given, by field (`temperature`, `budget`),
        each checked against the table's range before anything is loaded."""
        given = {s: getattr(self, s.attr) for s in sampling.SETTINGS}
        return {s.field: s.check(v, s.flag) for s, v in given.items() if v is not None}

    def validate(self) -> None:
        self.settings()

    def conversation(self) -> dict[str, Any]:
        """Keyword arguments for `chat.Conversation`: only what the user gave."""
        settings = self.settings()
        # /set's settings go in `settings`; one with a command of its own (the thinking
        # budget: /budget) is a keyword argument of its own.
        own = {
            s.field: settings.pop(s.field)
            for s in sampling.SETTINGS
            if s.command != "/set" and s.field in settings
        }
        mode: Literal["think", "direct"] | None = None
        if self.think is not None:
            mode = "think" if self.think else "direct"
        from qwenrun.ui.talk import given

        system = given(self.system, "the system prompt") if self.system else None
        return {"system": system, "mode": mode, "effort": self.effort, **own, "settings": settings}


# The keyword-only parameter of a command that receives each group.
_GROUPS: dict[str, type] = {"place": PlaceFlags, "load": LoadFlags, "talk": ChatFlags}
F = TypeVar("F", bound=Callable[..., Any])


def with_flags(fn: F) -> F:
    """Give a command the options of the groups it asks for (`load: LoadFlags`, ...).

    typer reads a command's signature; this one shows it the command's own parameters plus
    every field of each group, and hands the command one group value per group.
    """
    hints = typing.get_type_hints(fn)
    own = [p for p in inspect.signature(fn).parameters.values() if p.name not in _GROUPS]
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    wanted = {name: cls for name, cls in _GROUPS.items() if name in hints}
    group_hints = {name: typing.get_type_hints(cls) for name, cls in wanted.items()}
    extra = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=f.default,
            annotation=group_hints[g][f.name],
        )
        for g, cls in wanted.items()
        for f in fields(cls)
    ]
    params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own] + extra

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        for g, cls in wanted.items():
            kwargs[g] = cls(**{f.name: kwargs.pop(f.name) for f in fields(cls)})
        return fn(**kwargs)

    del command.__wrapped__  # typer must see the signature below, not the function's own
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command  # type: ignore[return-value]
