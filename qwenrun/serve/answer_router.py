"""The server's thinking splitter: which text is thinking and which is the answer, when a
Qwen model may write a tool call inside its thinking.

Contract: pure and incremental: the standard library, `qwenrun.thinking` and the tags of
`serve.toolcalls_xml` only.
`AnswerRouter(opened=…, divert_tool_calls=…)` is a `chat.Splitter` (`feed(piece)`, `flush()`,
`in_thinking`) around `thinking.ThinkSplitter`; without `divert_tool_calls` it is exactly that
splitter (plus `on_answer`, called once when the model closes its thinking with `</think>`:
the moment to force the start of the answer).

With `divert_tool_calls` (the request has tools), a `<tool_call>` written inside thinking is
decided by what follows it:

- `</think>` comes later: the call was a draft. It is thinking, whole, with the text around it
  as written (nothing glued), and the answer starts after `</think>` as usual.
- the model's text ends with no `</think>` (Qwen3.5 at times calls without closing its
  thinking, as llama.cpp's reasoning parser allows): the text from that `<tool_call>` on is
  the answer, where the tool-call parser reads it.
- after the call's `</tool_call>` (and whitespace) comes other text: the model thinks on, so the
  call was a draft; it is thinking at once, and a later `<tool_call>` is decided anew.

(The peers: vLLM's Qwen3 reasoning parser, given the whole text, reads it the same way: with a
`</think>` the thinking ends there, without one a `<tool_call>` followed by `<function` ends
it; while streaming it ends the thinking at such a `<tool_call>` at once, so a later `</think>`
lands in the content. llama.cpp's Qwen parser ends reasoning at `<tool_call>` whatever
follows. Waiting for what follows gives the whole-text reading while streaming.)

Until then the text from the `<tool_call>` (and the whitespace before it) is held back, neither
thinking nor answer: a hold-back bounded by the call blocks themselves (it ends at the first
non-call text after a `</tool_call>`, at `</think>`, or at the end of the text, where `flush`
gives it to the answer). A `<tool_call>` not followed (after whitespace) by a call's form, `{`
or `<function=`, is no call (the tag named in prose): it is thinking at once.

While a call is held `in_thinking` stays true: the thinking budget and clock treat it as
thinking, so a budget that runs out there closes the thinking, and the held call is then a
draft. A `</tool_call>` inside one of the held call's own values, followed by more text, ends
the hold early (this router does not parse the call): the call is then thinking, and a model
that never closes its thinking would lose it.
"""

from __future__ import annotations

from collections.abc import Callable

from qwenrun.serve.toolcalls_xml import CLOSE_TAG, FUNCTION_TAG, OPEN_TAG, skip_ws
from qwenrun.thinking import Answer, Thinking, ThinkSplitter, partial_suffix

__all__ = ["AnswerRouter"]

_WS = " \t\r\n"


class AnswerRouter:
    """See the module contract."""

    def __init__(
        self,
        *,
        opened: bool,
        divert_tool_calls: bool,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self._inner = ThinkSplitter(in_thinking=opened)
        self._divert = divert_tool_calls
        self._diverted = False  # the held calls went to the answer (at the end of the text)
        # Not holding: thinking text that may be the start of `<tool_call>` (and the whitespace
        # before it). Holding: everything from the whitespace before `<tool_call>` on.
        self._held = ""
        self._holding = False
        self._form = -1  # holding: after a `<tool_call>` whose form (`{`, `<function=`) is unseen
        self._scan = 0  # holding: where to look for the next `</tool_call>`
        self._after = -1  # holding: after a `</tool_call>`, where the look for what follows got
        self._on_answer = on_answer

    @property
    def in_thinking(self) -> bool:
        return self._inner.in_thinking and not self._diverted

    def feed(self, piece: str) -> list[Answer | Thinking]:
        events = self._inner.feed(piece)
        if self._divert:  # (else there is nothing to route: the per-token path stays short)
            events = self._route(events)
        # Thinking was seen and is over (even if `<think>` and `</think>` came in one piece).
        inner = self._inner
        if self._on_answer is not None and inner.saw_thinking and not inner.in_thinking:
            self._on_answer()
            self._on_answer = None
        return events

    def flush(self) -> list[Answer | Thinking]:
        events = self._route(self._inner.flush()) if self._divert else self._inner.flush()
        held, self._held = self._held, ""
        if self._holding:
            # The text ended with no `</think>` after the call: the answer's, as written.
            self._holding, self._diverted = False, True
            events.append(Answer(held))
        elif held.strip(_WS):
            events.append(Thinking(held))
        return events

    def _route(self, events: list[Answer | Thinking]) -> list[Answer | Thinking]:
        out: list[Answer | Thinking] = []
        for ev in events:
            if isinstance(ev, Answer):
                # `</think>` came: whatever is held was thinking (a drafted call, or a partial
                # tag that proved to be none).
                held, self._held = self._held, ""
                self._holding = False
                if held.strip(_WS):
                    out.append(Thinking(held))
                out.append(ev)
            else:
                self._think(ev.text, out)
        return out

    def _think(self, text: str, out: list[Answer | Thinking]) -> None:
        if self._holding:
            # Grown through a local that holds the only reference (in place, not copied).
            held, self._held = self._held, ""
            held += text
            self._held = held
            self._hold(out)
            return
        text = self._held + text
        at = text.find(OPEN_TAG)
        if at < 0:
            keep = partial_suffix(text, OPEN_TAG)
            body = text[: len(text) - keep].rstrip(_WS)
            self._held = text[len(body) :]
            if body:
                out.append(Thinking(body))
            return
        before = text[:at].rstrip(_WS)
        if before:
            out.append(Thinking(before))
        self._holding = True
        self._held = text[len(before) :]  # the whitespace before the tag stays with the call
        self._form = at - len(before) + len(OPEN_TAG)
        self._after = -1
        self._hold(out)

    def _hold(self, out: list[Answer | Thinking]) -> None:
        """Look on in the held calls for where they end and what follows them."""
        held = self._held
        while True:
            if self._form >= 0:
                # Only a call's own form may follow `<tool_call>` (as vLLM checks for
                # `<function`): the tag named in prose is thinking at once.
                j = self._form = skip_ws(held, self._form)
                if j == len(held) or FUNCTION_TAG.startswith(held[j:]):
                    return
                if not (held.startswith("{", j) or held.startswith(FUNCTION_TAG, j)):
                    self._holding, self._held, self._form = False, "", -1
                    tag_end = held[:j].rstrip(_WS)
                    out.append(Thinking(tag_end))
                    self._think(held[len(tag_end) :], out)
                    return
                self._form, self._scan = -1, j
            if self._after < 0:
                close = held.find(CLOSE_TAG, self._scan)
                if close < 0:
                    # Only where a new `</tool_call>` could start is looked at next time.
                    self._scan = max(self._scan, len(held) - len(CLOSE_TAG) + 1)
                    return
                self._after = close + len(CLOSE_TAG)
            j = self._after = skip_ws(held, self._after)
            if j == len(held):
                return
            if held.startswith(OPEN_TAG, j):
                self._form, self._after = j + len(OPEN_TAG), -1  # another call: hold on
                continue
            if OPEN_TAG.startswith(held[j:]):
                return
            # Other text after the calls: the model thinks on; the calls were drafts.
            self._holding, self._held = False, ""
            out.append(Thinking(held[:j]))
            self._think(held[j:], out)
            return
