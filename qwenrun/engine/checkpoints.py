"""Context checkpoints: where a hybrid model's recurrent state can be taken back to.

Contract: the hybrid Qwen models (qwen3next, qwen35moe, qwen4exp) keep, besides an attention
KV cache, a recurrent state (Gated DeltaNet) that llama.cpp cannot roll back:
`llama_memory_seq_rm` refuses to drop the end of the sequence. A `CheckpointStore` keeps
copies of that state (`llama_state_seq_get_data_ext` with `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`:
the recurrent part only, a fixed size per model, 63 MiB for Qwen3.5-35B-A3B) taken at chosen
positions, and puts one back later in the one order llama.cpp accepts: restore the partial
state first, then trim the attention KV past it (`seq_rm(n, -1)`, which succeeds once the
recurrent part is at n-1).

The store keeps at most `max_count` checkpoints and `max_bytes` bytes (the oldest, i.e. the
earliest positions, go first) and reuses the buffer of an evicted checkpoint for the next
(a fresh 63 MiB buffer costs more in page faults than the copy). Every checkpoint covers a
prefix of what the context holds: the engine drops the ones past a position whenever the
context is cut there (`drop_after`) and all of them when it is cleared. A checkpoint handed
to the disk cache (`share`) is never recycled, so a background write never sees it change.

`positions()` is the pure rule for where to take checkpoints while a prompt is evaluated
(see its docstring). Nothing here decides when to evaluate or touches files.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun.engine.native import bindings
from qwenrun.units import GIB

DEFAULT_MAX_COUNT = 8
# 8 checkpoints of Qwen3.5-35B-A3B (63 MiB each) or Qwen3-Next-80B (75 MiB), 5 of
# Qwen3.5-397B (186 MiB): a bounded share of the RAM next to the experts.
DEFAULT_MAX_BYTES = 1 * GIB

# A prompt evaluated over at least this many tokens also gets checkpoints at these distances
# before its generation prompt: a later prompt that keeps a long document but changes the
# question after it restarts at most about that many tokens before the change.
LONG_SPAN = 1024
TAIL_OFFSETS = (32, 256, 2048, 16384)

# How far before the end a checkpoint goes when the prompt has no `<|im_start|>assistant\n`:
# the next chat turn re-renders the end of the previous prompt (Qwen's templates drop the
# think tags, `<think>\n\n</think>\n\n` is 4 tokens), as llama-server's offset of 4 allows for.
END_OFFSET = 4


@dataclass(frozen=True)
class ChatMarks:
    """Qwen's message markers as token ids: `<|im_start|>` and the tokens of `assistant\\n`."""

    im_start: int
    assistant: tuple[int, ...]


def positions(prompt: Sequence[int], start: int, marks: ChatMarks | None) -> list[int]:
    """Where to checkpoint while evaluating `prompt[start:]`: the positions a later prompt
    is likely to share up to exactly, sorted, each in (start, len(prompt) - 1].

    - Right after the last `<|im_start|>assistant\\n`: the next turn keeps the prompt up to
      there and replaces what follows (the think tags) with the answer. Without that marker,
      END_OFFSET tokens before the end.
    - The start of the message before it (the last user message): a turn cancelled before
      its first token, or a re-sent conversation with that message edited, comes back there.
    - For a long evaluation (LONG_SPAN), TAIL_OFFSETS tokens before the first position: the
      same document with another question.

    Never the last token: a restored state holds no logits, so at least one token of the
    next prompt must be evaluated, and an identical prompt then still finds a checkpoint.
    """
    end = len(prompt) - 1
    if end <= start:
        return []
    wanted: set[int] = set()
    anchor = max(0, len(prompt) - END_OFFSET)
    if marks is not None:
        starts = _last_two(prompt, marks.im_start)
        if starts:
            last = starts[-1]
            head = last + 1
            if tuple(prompt[head : head + len(marks.assistant)]) == marks.assistant:
                anchor = head + len(marks.assistant)
            if len(starts) == 2:
                wanted.add(starts[0])
    wanted.add(min(anchor, end))
    if end - start >= LONG_SPAN:
        wanted.update(anchor - d for d in TAIL_OFFSETS)
    return sorted(p for p in wanted if start < p <= end)


def _last_two(tokens: Sequence[int], token: int) -> list[int]:
    """The indexes of the last two occurrences of `token` (fewer if there are fewer)."""
    found: list[int] = []
    rev = list(reversed(tokens))  # list.index runs in C: fast on a 100k-token prompt
    pos = 0
    while len(found) < 2:
        try:
            pos = rev.index(token, pos)
        except ValueError:
            break
        found.append(len(tokens) - 1 - pos)
        pos += 1
    return sorted(found)


# --------------------------------------------------------------------------------------
# Sequence state in and out of llama.cpp (seq 0, the only sequence qwenrun uses)


def read_state(ctx: Any, flags: int, into: bytearray | None = None) -> bytearray | None:
    """Seq 0's state (`flags` 0: all of it; PARTIAL: the recurrent part) as bytes; `into`
    is reused when it has the exact size. None if llama.cpp wrote less than it announced."""
    lc = bindings()
    size = int(lc.llama_state_seq_get_size_ext(ctx, 0, flags))
    if size <= 0:
        return None
    buf = into if into is not None and len(into) == size else bytearray(size)
    view = (ctypes.c_uint8 * size).from_buffer(buf)
    written = int(lc.llama_state_seq_get_data_ext(ctx, view, size, 0, flags))
    del view  # a live export would keep the bytearray from ever being resized or freed
    return buf if written == size else None


def write_state(ctx: Any, data: bytearray, flags: int) -> bool:
    """Load bytes from `read_state` into seq 0; True only if llama.cpp took all of them.

    After a False the memory may be half replaced: the caller must clear it.
    """
    if not data:
        return False
    lc = bindings()
    view = (ctypes.c_uint8 * len(data)).from_buffer(data)
    try:
        return int(lc.llama_state_seq_set_data_ext(ctx, view, len(data), 0, flags)) == len(data)
    finally:
        del view


def partial_flag() -> int:
    return int(bindings().LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)


# --------------------------------------------------------------------------------------
# The store


@dataclass
class Checkpoint:
    """The recurrent state after the first `n_tokens` tokens of what the context holds."""

    n_tokens: int
    data: bytearray
    shared: bool = False  # also referenced by a pending disk write: never recycled


class CheckpointStore:
    """Bounded checkpoints of seq 0, in position order. `max_count=0` disables it."""

    def __init__(
        self, max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.items: list[Checkpoint] = []
        self._spare: bytearray | None = None
        self.saved = 0  # checkpoints taken since the engine was loaded
        self.restored = 0

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 and self.max_bytes > 0

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def bytes(self) -> int:
        return sum(len(c.data) for c in self.items)

    def save(self, ctx: Any, n_tokens: int) -> Checkpoint | None:
        """Checkpoint the context, which must hold exactly `n_tokens` tokens now."""
        if not self.enabled:
            return None
        data = read_state(ctx, partial_flag(), self._spare)
        if data is self._spare:
            self._spare = None
        if data is None or len(data) > self.max_bytes:
            return None
        self.items = [c for c in self.items if c.n_tokens != n_tokens]
        ckpt = Checkpoint(n_tokens, data)
        self.items.append(ckpt)
        self.items.sort(key=lambda c: c.n_tokens)
        while self.count > self.max_count or self.bytes > self.max_bytes:
            self._release(self.items.pop(0))
        self.saved += 1
        return ckpt

    def add(self, n_tokens: int, data: bytearray) -> None:
        """Keep a checkpoint read from elsewhere (the disk cache) for this context."""
        if not self.enabled or len(data) > self.max_bytes:
            return
        self.items = [c for c in self.items if c.n_tokens != n_tokens]
        self.items.append(Checkpoint(n_tokens, data))
        self.items.sort(key=lambda c: c.n_tokens)
        while self.count > self.max_count or self.bytes > self.max_bytes:
            self._release(self.items.pop(0))

    def best(self, n_tokens: int) -> Checkpoint | None:
        """The latest checkpoint at or before `n_tokens`."""
        for ckpt in reversed(self.items):
            if ckpt.n_tokens <= n_tokens:
                return ckpt
        return None

    def restore(self, ctx: Any, mem: Any, ckpt: Checkpoint) -> bool:
        """Put the context back to `ckpt`: recurrent state, then the attention KV trimmed.

        False if llama.cpp refused either step; the memory is then in an unknown state and
        the caller must clear it (and this store).
        """
        lc = bindings()
        if not write_state(ctx, ckpt.data, partial_flag()):
            return False
        # The recurrent tail is now at n-1, so removing [n, end) only trims the attention KV.
        # Never a range with an end (p1 >= 0): on a hybrid that cuts a hole in the attention
        # KV alone and llama.cpp says yes.
        if not lc.llama_memory_seq_rm(mem, 0, ckpt.n_tokens, -1):
            return False
        self.drop_after(ckpt.n_tokens)
        self.restored += 1
        return True

    def drop_after(self, n_tokens: int) -> None:
        """Forget the checkpoints past `n_tokens` (the context no longer holds those tokens)."""
        keep = [c for c in self.items if c.n_tokens <= n_tokens]
        for c in self.items[len(keep) :]:
            self._release(c)
        self.items = keep

    def clear(self) -> None:
        self.drop_after(-1)

    def share(self, up_to: int) -> list[Checkpoint]:
        """The checkpoints at or before `up_to`, marked as read elsewhere (never recycled)."""
        out = [c for c in self.items if c.n_tokens <= up_to]
        for c in out:
            c.shared = True
        return out

    def _release(self, ckpt: Checkpoint) -> None:
        if not ckpt.shared and self._spare is None:
            self._spare = ckpt.data
