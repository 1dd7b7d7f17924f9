"""`run` and `chat` on the command line around the conversation, so that `cli.py` stays wiring.

Contract: `read_prompt` is `run`'s prompt (piped stdin, then the argument) and `given` any other
text the command line hands over (`--system`): both pass through `text.clean`, so bytes that are
not UTF-8 become U+FFFD, said once on stderr (`text.notice`). `plan_facts` and `remote_facts`
are the few facts of the start-up line (`console.show_startup`): the quant, where the experts
are, the expected speed, the context; the plan's reasons go under that line only with
`--verbose` (and in `qwenrun plan`). `answer_once` (`run`) and `chat_here` (`chat`) are the two
commands on a model loaded here: the conversation with the user's settings, the start-up line,
the renderer for where stdout goes, the turn or the REPL, the engine closed. With RPC workers, a
worker lost mid-chat ends the process, so `chat_here` first has the conversation saved under
`QWENRUN_HOME/chats/` (`rpc.when_lost`) and the error line says where.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from qwenrun import errors, text
from qwenrun.ui.console import info, show_startup

if TYPE_CHECKING:
    from qwenrun.chat import Conversation
    from qwenrun.launch import Started
    from qwenrun.offload import Plan
    from qwenrun.serve.client import RemoteModel


def given(value: str, where: str) -> str:
    """`value` with what was not UTF-8 replaced, and a notice saying so (`where`: "the
    system prompt")."""
    cleaned, replaced = text.clean(value)
    if replaced:
        info(text.notice(replaced, where), style="yellow")
    return cleaned


def read_prompt(prompt: str | None) -> str:
    """Piped stdin, then the argument (as Ollama orders them), as one clean prompt.

    The document first and the question last also means that asking another question about
    the same piped document shares its whole prefix with the last run: the prompt cache then
    loads the document's evaluation instead of redoing it.
    """
    piped = ""
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
    parts = [p for p in (piped.strip(), prompt) if p]
    if not parts:
        raise errors.UsageError(
            "no prompt given",
            hint='pass one as an argument, or pipe it in: echo "hi" | qwenrun run MODEL',
        )
    return given("\n\n".join(parts), "the prompt")


def plan_facts(plan: Plan, n_ctx: int) -> list[str]:
    """The start-up line's facts of a model loaded here."""
    from qwenrun.ui.tables import placement_text

    return [
        plan.quant,
        placement_text(plan),
        f"≈{plan.decode_tok_s:,.0f} tok/s expected",
        f"context {n_ctx:,} tokens",
    ]


def remote_facts(remote: RemoteModel) -> list[str]:
    """The start-up line's facts of a model a server runs (`--server`)."""
    facts = [f"served by {remote.url} as {remote.id}"]
    if remote.info.get("placement_text"):
        facts.append(str(remote.info["placement_text"]))
    if remote.n_ctx:
        facts.append(f"context {remote.n_ctx:,} tokens")
    return facts


class Talk(Protocol):
    """How to talk, as the command line gave it (`flags.ChatFlags`)."""

    @property
    def show_thinking(self) -> bool: ...
    def conversation(self) -> dict[str, Any]: ...


def _conversation(started: Started, talk: Talk, *, announce: bool, reasons: bool) -> Conversation:
    """The conversation on the loaded model; when `announce`, the start-up line (and under it
    the plan's `reasons`)."""
    from qwenrun.chat import Conversation

    engine = started.engine
    conv = Conversation.for_engine(engine, notice=info, **talk.conversation())
    if announce:
        facts = plan_facts(started.plan, engine.n_ctx)
        show_startup(conv.profile.name, started.reasons if reasons else (), facts=facts)
    return conv


def answer_once(started: Started, prompt: str, talk: Talk, *, as_json: bool, verbose: bool) -> None:
    """`run` on a model loaded here: one turn on stdout, the start-up line only with
    --verbose; the engine is closed whatever happens."""
    from qwenrun import chat
    from qwenrun.ui import render

    engine = started.engine
    try:
        conv = _conversation(started, talk, announce=verbose, reasons=verbose)
        out = render.make_renderer(
            as_json=as_json,
            show_thinking=talk.show_thinking,
            show_stats=True if verbose else None,
            extra={"placement": engine.placement.to_dict()},
        )
        chat.one_shot(engine, conv, prompt, out)
    finally:
        engine.close()


def chat_here(started: Started, talk: Talk, *, verbose: bool) -> int:
    """`chat` on a model loaded here: the start-up line, then the REPL; its exit status."""
    from qwenrun.ui import render, repl

    engine = started.engine
    try:
        conv = _conversation(started, talk, announce=True, reasons=verbose)
        out = render.make_renderer(
            show_thinking=talk.show_thinking, show_stats=True if verbose else None
        )
        if started.plan.load.placement.rpc_workers:
            _keep_when_a_worker_is_lost(conv)
        return repl.repl(engine, conv, out)
    finally:
        engine.close()


def _keep_when_a_worker_is_lost(conv: Conversation) -> None:
    """A worker lost mid-chat ends the process (llama.cpp has no way back): keep the
    conversation first, in qwenrun's home, and say where in the one error line."""
    from qwenrun import config
    from qwenrun.engine import rpc

    def keep() -> str | None:
        if not conv.turns:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = config.qwenrun_home() / "chats" / f"lost-worker-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        conv.save(path)
        return f"the conversation is kept: /load {path}"

    rpc.when_lost(keep)
