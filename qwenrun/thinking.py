"""Split a model's streamed text into thinking and answer, and keep thinking within a budget.

Contract: pure and incremental. `ThinkSplitter.feed(piece)` takes text pieces as the engine
yields them and returns `Thinking(text)` / `Answer(text)` events; `flush()` ends the stream.
A tag split across pieces (`"<th"`, `"ink>"`) is held back until it is known whether it is a
tag. `ThinkingBudget` says when to steer the engine out of thinking (the caller forces the
text it returns, as llama.cpp's `--reasoning-budget` does). This module imports nothing
outside the standard library and does no I/O; it knows nothing about the engine or the UI.

Qwen's formats, which this handles:

- hybrids in thinking mode: the model writes `<think>\\n…\\n</think>\\n\\n` then the answer;
- direct mode: the template already wrote an empty `<think>\\n\\n</think>\\n\\n`, so the
  output is answer only (no block at all);
- thinking-only models and Qwen3.5/3.6: the prompt itself ends inside `<think>\\n`, so the
  output starts in thinking and only `</think>` appears (`ThinkSplitter(in_thinking=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
_WS = " \t\r\n"

# What the engine is made to write when the thinking budget runs out. Qwen3's technical
# report halts thinking with this very sentence (the models were trained to go on from it),
# which gives better answers than a bare cut.
WRAP_UP = (
    "\n\nConsidering the limited time by the user, I have to give the solution "
    "based on the thinking directly now.\n" + CLOSE_TAG + "\n\n"
)
# A zero budget (no thinking at all) closes the block without a word.
BARE_CLOSE = "\n" + CLOSE_TAG + "\n\n"


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class Answer:
    text: str


Event = Thinking | Answer


class State(Enum):
    START = "start"  # nothing seen yet: a `<think>` may open, or the answer begins
    THINK_START = "think_start"  # inside thinking, before its first visible character
    THINKING = "thinking"
    ANSWER_START = "answer_start"  # after `</think>`, dropping the blank lines before the answer
    ANSWER = "answer"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """An incremental `<think>…</think>` splitter (after ollama's thinking.Parser).

    `in_thinking=True` when the prompt already opened the block (see `prompt_opens_thinking`).
    Whitespace right after `<think>` and right after `</think>` is dropped, and so is
    whitespace just before `</think>`: it is held back while thinking streams, because it is
    only known to be trailing once the close tag arrives.
    """

    def __init__(self, *, in_thinking: bool = False) -> None:
        self.state = State.THINK_START if in_thinking else State.START
        self._buf = ""
        # Whitespace held back while thinking, kept apart from `_buf`: it cannot hold
        # `</think>`, so it is never searched again and feeding stays linear.
        self._ws: list[str] = []
        self.saw_thinking = in_thinking

    @property
    def in_thinking(self) -> bool:
        return self.state in (State.THINK_START, State.THINKING)

    def feed(self, piece: str) -> list[Event]:
        self._buf += piece
        events: list[Event] = []
        # Each step consumes a prefix of the buffer; it returns False when it must wait.
        while self._buf and self._step(events):
            pass
        return events

    def flush(self) -> list[Event]:
        """The stream ended: whatever is held back is text of the current part."""
        events: list[Event] = []
        rest, self._buf = "".join(self._ws) + self._buf, ""
        self._ws = []
        if self.state is State.START:
            rest = rest.lstrip(_WS)
            if rest:
                events.append(Answer(rest))
        elif self.state is State.THINKING:
            # Held-back trailing whitespace of an unclosed block adds nothing worth showing.
            if rest.strip(_WS):
                events.append(Thinking(rest))
        elif self.state is State.ANSWER and rest:
            events.append(Answer(rest))
        return events

    # ---- one state each

    def _step(self, events: list[Event]) -> bool:
        if self.state is State.START:
            return self._start()
        if self.state is State.THINK_START:
            return self._think_start()
        if self.state is State.THINKING:
            return self._thinking(events)
        if self.state is State.ANSWER_START:
            return self._answer_start()
        events.append(Answer(self._buf))
        self._buf = ""
        return False

    def _start(self) -> bool:
        text = self._buf.lstrip(_WS)
        if text.startswith(OPEN_TAG):
            self._buf = text[len(OPEN_TAG) :]
            self.state = State.THINK_START
            self.saw_thinking = True
            return True
        if not text or OPEN_TAG.startswith(text):
            return False  # only whitespace or a partial `<think>` so far
        self._buf = text
        self.state = State.ANSWER
        return True

    def _think_start(self) -> bool:
        text = self._buf.lstrip(_WS)
        # A model whose prompt opened the block may still write `<think>` itself: drop it.
        if text.startswith(OPEN_TAG):
            self._buf = text[len(OPEN_TAG) :]
            return True  # strip the whitespace after it on the next step
        self._buf = text
        if OPEN_TAG.startswith(text):
            return False  # nothing yet, or a partial `<think>` ("<" may also open `</think>`)
        self.state = State.THINKING
        return True

    def _thinking(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(CLOSE_TAG)
        if at >= 0:
            body = buf[:at].rstrip(_WS)
            if body:
                events.append(Thinking("".join(self._ws) + body))
            self._ws = []  # whitespace just before `</think>` is dropped
            self._buf = buf[at + len(CLOSE_TAG) :]
            self.state = State.ANSWER_START
            return True
        # Hold back a possible start of `</think>` and, before it, trailing whitespace.
        keep = partial_suffix(buf, CLOSE_TAG)
        body = buf[: len(buf) - keep]
        stripped = body.rstrip(_WS)
        if stripped:
            events.append(Thinking("".join(self._ws) + stripped))
            self._ws = []
        if len(stripped) < len(body):
            self._ws.append(body[len(stripped) :])
        self._buf = buf[len(buf) - keep :]
        return False

    def _answer_start(self) -> bool:
        text = self._buf.lstrip(_WS)
        self._buf = text
        if not text:
            return False
        self.state = State.ANSWER
        return True


def split_text(text: str, *, in_thinking: bool = False) -> tuple[str, str]:
    """The whole-text form: (thinking, answer) of a finished output."""
    splitter = ThinkSplitter(in_thinking=in_thinking)
    events = splitter.feed(text) + splitter.flush()
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    return thinking, answer


def prompt_opens_thinking(prompt: str, assistant_marker: str = "<|im_start|>assistant") -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block (Qwen3.5, *-Thinking).

    Only the generation prompt counts: the text after the last assistant header. With no such
    header, the whole prompt is looked at.
    """
    at = prompt.rfind(assistant_marker)
    tail = prompt[at:] if at >= 0 else prompt
    opened = tail.rfind(OPEN_TAG)
    return opened >= 0 and tail.find(CLOSE_TAG, opened) < 0


class ThinkingBudget:
    """When to steer the model out of thinking.

    `limit` is the user's budget in thinking tokens (None: no budget). `max_tokens`, when the
    caller caps the whole output, keeps a share for the answer: the last quarter of it (at
    most 1024 tokens, at least 1) is never spent on thinking, and that includes the text
    forced to close it. So thinking that would eat into that share is closed early enough for
    the close to fit before it, and a budget's wrap-up sentence that would not fit there gives
    way to the bare close: the reply is never empty just because thinking ran long. `step`
    returns the text to force once, then None.
    """

    def __init__(self, limit: int | None = None, max_tokens: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError("a thinking budget cannot be negative")
        self.limit = limit
        self.reserve_at: int | None = None  # where the answer's share of the output begins
        if max_tokens is not None and max_tokens > 1:
            self.reserve_at = max_tokens - max(1, min(max_tokens // 4, 1024))
        self.fired = False

    def step(
        self,
        in_thinking: bool,
        thinking_tokens: int,
        *,
        generated: int | None = None,
        cost: Callable[[str], int] | None = None,
    ) -> str | None:
        """Call after each piece with the tokens spent in thinking so far.

        `generated` is every token of the output so far (what `max_tokens` counts; by default
        `thinking_tokens`, as when the prompt opened the block), and `cost(text)` how many
        tokens forcing `text` takes (by default nothing: then the close is assumed free).
        """
        if self.fired or not in_thinking:
            return None
        spent = thinking_tokens if generated is None else generated

        def after(text: str) -> int:
            """The tokens of output once `text` is forced."""
            return spent + (cost(text) if cost is not None else 0)

        if self.limit is not None and thinking_tokens >= self.limit:
            self.fired = True
            wrap_fits = self.reserve_at is None or after(WRAP_UP) <= self.reserve_at
            return WRAP_UP if self.limit > 0 and wrap_fits else BARE_CLOSE
        if self.reserve_at is not None and after(BARE_CLOSE) >= self.reserve_at:
            self.fired = True
            return BARE_CLOSE
        return None
