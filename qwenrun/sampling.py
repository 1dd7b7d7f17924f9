"""The sampling settings a user can give, in one table that every consumer reads.

Contract: `SETTINGS` holds one `Setting` per setting: its name (`/set temp`, `--temp`), the
field it fills (`SamplingParams.temperature`, a transcript's `"temperature"`), its type and
range, the value the engine uses when neither the user nor the model's preset gives one, its
help text, the request fields the server reads it from, and the REPL command that sets it.
The command line's options (`flags.ChatFlags`), the REPL's `/set` and `/budget` and its
completion, `/stats`, transcripts, the server's request checks and model card, the `--server`
client and the copy of the catalog's presets all read this table, so a new setting is one row
here, plus its use in the engine (a `SamplingParams` field and the sampler chain; and a
`catalog.SamplingPreset` field if Qwen's cards give it a value).

`Setting.check` takes a typed value (JSON, a typer option) and `Setting.parse` text (`/set`);
both return it typed and within the range, or raise a one-line `UsageError` that names the
setting (as the caller spells it: `--temp`, `temp`, `temperature`) and the range. `lookup`
and `read` find a `/set` setting by any of its names (`top-p`, `top_p`). Numbers in messages
and in `/stats` are written as people write them (`format_number`: 10,000,000 and 0.00001,
never 1e+07 or 1e-05). Pure: no I/O, no engine; imports only `errors`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from qwenrun import errors

Number = int | float


def format_number(value: float) -> str:
    """10,000,000 for an int; 0.0, 5.0, 0.95 or 0.00001 for a float (never an exponent)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return f"{int(value):,}"
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    # repr is the shortest text that reads back as this float; Decimal spells it out.
    text = format(Decimal(repr(value)), ",f")
    return text if "." in text else text + ".0"


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its names, its type and range, where each consumer finds it."""

    key: str  # what people type: `/set KEY`, `--KEY`
    field: str  # the `SamplingParams` field (or the conversation's own), a transcript's key
    kind: type[int] | type[float]
    lo: Number  # the range, both ends included
    hi: Number
    default: Number | None  # the engine's value when neither the user nor a preset sets one
    server: tuple[str, ...]  # request fields: of those a request gives, the first listed
    #                          wins; `--server` sends the first
    help: str  # the command-line help, as `--help` shows it
    command: str = "/set"  # the REPL command that sets it: `/set KEY VALUE`, or its own
    sampler: bool = True  # a `SamplingParams` field (False: the turn's own limit)
    quiet_at_default: bool = False  # `/stats` leaves it out while it is at its default

    @property
    def flag(self) -> str:
        return "--" + self.key

    @property
    def attr(self) -> str:
        """Its Python name: the command-line option's parameter, a keyword argument."""
        return self.key.replace("-", "_")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.key, self.attr, self.field)))

    def check(self, value: Any, name: str | None = None) -> Number:
        """A typed value (a JSON number, a parsed option) checked against the type and range.

        A whole-number setting given 2.0 takes 2; given 2.5 it is refused, not cut. Text and
        true/false are refused: they are not numbers in JSON.
        """
        name = name or self.key
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and self.kind is int and isinstance(value, float):
            ok = value.is_integer()
        if not ok:
            raise self._type_error(value, name)
        # The range is checked before a float setting's int is converted: 10**400 is refused
        # as out of range, not lost in an OverflowError.
        exact: Number = int(value) if self.kind is int else value
        self._check_range(exact, format_number(exact), name)
        return self.kind(exact)

    def parse(self, text: str, name: str | None = None) -> Number:
        """Text as typed (`/set temp 0.7`), typed and checked; the error shows it as typed."""
        name = name or self.key
        try:
            typed: Number = self.kind(text)
        except (TypeError, ValueError, OverflowError):
            raise self._type_error(text, name) from None
        self._check_range(typed, text.strip(), name)
        return typed

    def show(self, value: Number | None) -> str:
        """The value as `/stats` writes it."""
        return "unset" if value is None else format_number(value)

    def range_text(self) -> str:
        return f"{format_number(self.lo)} to {format_number(self.hi)}"

    def _type_error(self, value: Any, name: str) -> errors.UsageError:
        wanted = "a whole number" if self.kind is int else "a number"
        return errors.UsageError(f"{name} needs {wanted}, not {value!r}")

    def _check_range(self, value: Number, shown: str, name: str) -> None:
        # `not lo <= v <= hi` also refuses NaN, which compares false with everything.
        if not self.lo <= value <= self.hi:
            raise errors.UsageError(
                f"{name} must be between {format_number(self.lo)} and "
                f"{format_number(self.hi)}, not {shown}"
            )


# The table. Ranges are the ones every consumer enforces (the command line, `/set`,
# transcripts and the server alike), chosen so that nothing the engine accepts sensibly is
# refused and nothing it would mangle gets through:
# - temperature 0–5: llama.cpp takes any temperature and OpenAI documents 0–2, but with a
#   truncation sampler (min-p, top-k) temperatures up to about 5 still give usable, more
#   varied text, and llama-server and vLLM accept them too; 5 keeps out typos such as 70.
# - repeat penalty 0.01–10: llama.cpp divides a repeated token's logit by it, so 0 would
#   give infinities; 1 is off, usual values are 1.0–1.3, and 10 is far past any use.
# - seed -1 to 4,294,967,295: llama.cpp's seeds are 32 bits (a wider one would be folded, two
#   seeds sampling alike); -1 is llama-server's "random", which some clients send (the engine
#   folds it to 4,294,967,295, llama.cpp's own "random").
# - max tokens and thinking budget up to 10,000,000: far above any context, so only a typo
#   is refused.
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    #       key                 field               kind   lo    hi             default
    Setting("temp",             "temperature",      float, 0.0,  5.0,           0.7,
            server=("temperature",),
            help="Sampling temperature (default: Qwen's preset)."),
    Setting("top-p",            "top_p",            float, 0.0,  1.0,           0.8,
            server=("top_p",),
            help="Nucleus sampling threshold."),
    Setting("top-k",            "top_k",            int,   0,    1_000_000,     20,
            server=("top_k",),
            help="Sample from the K most likely tokens."),
    Setting("min-p",            "min_p",            float, 0.0,  1.0,           0.0,
            server=("min_p",),
            help="Drop tokens below this share of the best."),
    Setting("presence-penalty", "presence_penalty", float, -2.0, 2.0,           0.0,
            server=("presence_penalty",), quiet_at_default=True,
            help="Penalise tokens already used."),
    Setting("repeat-penalty",   "repeat_penalty",   float, 0.01, 10.0,          1.0,
            server=("repeat_penalty",), quiet_at_default=True,  # llama-server's name
            help="Penalise repeats of the last 64 tokens (1: off)."),
    Setting("seed",             "seed",             int,   -1,   2**32 - 1,     None,
            server=("seed",), quiet_at_default=True,
            help="Random seed for reproducible sampling."),
    # The turn's own limits: not the sampler's.
    Setting("max-tokens",       "max_tokens",       int,   1,    10_000_000,    None,
            server=("max_completion_tokens", "max_tokens"), sampler=False,  # OpenAI's new, old
            help="Stop after this many tokens."),
    Setting("budget",           "budget",           int,   0,    10_000_000,    None,
            server=("reasoning_budget", "thinking_budget"), sampler=False,  # llama.cpp's, Qwen's
            command="/budget",
            help="Stop thinking after N tokens."),
)
# fmt: on

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
# What `/set KEY VALUE` sets (and a transcript's "settings" object holds).
SET_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.command == "/set")
SAMPLER_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.sampler)


def lookup(name: str, among: Iterable[Setting] = SET_SETTINGS) -> Setting:
    """A setting by any of its names (`top-p`, `top_p`; `temp`, `temperature`)."""
    among = tuple(among)
    for s in among:
        if name in s.names:
            return s
    raise errors.UsageError(
        f"unknown setting {name!r}", hint=f"one of: {', '.join(s.key for s in among)}"
    )


def read(name: str, value: Any) -> tuple[Setting, Number]:
    """A `/set` setting by any of its names and a value (text or number), checked."""
    setting = lookup(name)
    if isinstance(value, str):
        return setting, setting.parse(value)
    return setting, setting.check(value)
