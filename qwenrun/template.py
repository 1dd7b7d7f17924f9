"""A model's chat template, and what it tells about the model: thinking kind and presets.

Contract: `ChatTemplate` renders a GGUF's `tokenizer.chat_template` the way llama.cpp's Jinja
formatter does (jinja2's immutable sandbox, `enable_thinking` passed per render), so a template
can never touch the machine; a template that fails is the model's problem, reported as an
`InvalidModelError`. `detect_thinking_kind` learns by rendering whether the model is hybrid,
thinking-only (its template always opens `<think>`, or refuses `enable_thinking=false`, as
Qwen3.8-2.4T-A95B's does) or direct-only; `reasoning_efforts` learns which `reasoning_effort`
values the template takes (Qwen3.8-Flash-Next: xhigh, medium, low), `check_effort` refuses any
other in one line; `model_profile` adds Qwen's sampling presets per mode (the catalog's, or
Qwen3's defaults for a GGUF the catalog does not know). `match_catalog` finds the catalog entry
a GGUF's metadata names; `fallback_template` is Qwen3's own template (the copy in
`synthetic/templates/`) for a GGUF that carries none, the one file read here. Nothing here
tokenizes, runs the model or keeps a conversation (`chat.py` does).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenrun import errors, sampling
from qwenrun.catalog import ThinkingKind
from qwenrun.engine.values import SamplingParams
from qwenrun.thinking import prompt_opens_thinking

if TYPE_CHECKING:
    from qwenrun.catalog import ModelSpec

Mode = Literal["think", "direct"]

# Qwen3's model card: thinking 0.6/0.95/20/0, non-thinking 0.7/0.8/20/0. Used for a GGUF the
# catalog does not know, and for a mode its catalog entry gives no preset for.
DEFAULT_PRESETS: dict[str, SamplingParams] = {
    "think": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),
    "direct": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0),
}


# --------------------------------------------------------------------------------------
# The chat template


class ChatTemplate:
    """A GGUF's `tokenizer.chat_template`, rendered as llama.cpp's Jinja formatter does.

    Same environment as llama-cpp-python's `Jinja2ChatFormatter`: sandboxed, trim/lstrip
    blocks, loop controls, a `tojson` that keeps non-ASCII text, `raise_exception` and
    `strftime_now`. A template error is the model's problem, reported as one.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols"],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise errors.InvalidModelError(
                f"the model's chat template does not parse: {exc}",
                hint="use a GGUF with a working tokenizer.chat_template",
            ) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        enable_thinking: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt for `messages`, ending with the assistant's generation prompt.

        `tools` (OpenAI function tools) are rendered by the template itself, as the model
        was trained; `extra` adds template variables (a request's `chat_template_kwargs`)
        but never replaces the ones set here.
        """
        variables: dict[str, Any] = dict(extra or {})
        if tools is not None:
            variables["tools"] = list(tools)
        variables.update(
            messages=list(messages),
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._template.render(**variables)
        except Exception as exc:
            # Not only TemplateError: a filter fed the wrong type (`|items` on a string)
            # raises TypeError, and that too is the template refusing these messages.
            raise errors.InvalidModelError(
                f"the model's chat template failed: {exc}",
                hint="the template rejected this conversation; try /clear",
            ) from None


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def fallback_template() -> str:
    """Qwen3's own template, for a GGUF that carries none (all Qwen models speak ChatML)."""
    return (Path(__file__).parent / "synthetic" / "templates" / "qwen3.jinja").read_text("utf-8")


_PROBE = ({"role": "user", "content": "hi"},)


def detect_thinking_kind(template: ChatTemplate) -> ThinkingKind:
    """What the template supports, learnt by rendering it: the truth for this very file.

    A template that refuses `enable_thinking=false` (Qwen3.8-2.4T-A95B's raises) or whose
    prompt always opens `<think>` → thinking-only; `enable_thinking` changes the prompt →
    hybrid; neither → direct-only.
    """
    on = template.render(_PROBE, enable_thinking=True)
    try:
        off = template.render(_PROBE, enable_thinking=False)
    except errors.InvalidModelError:
        return "thinking"  # it has no direct mode, and says so by refusing to render one
    if on != off:
        return "hybrid"
    return "thinking" if prompt_opens_thinking(on) else "direct"


# `reasoning_effort` values worth asking a template about: OpenAI's and Qwen3.8's words.
EFFORT_WORDS = ("max", "xhigh", "high", "medium", "low", "minimal", "none")


@functools.lru_cache(maxsize=16)
def _efforts(source: str) -> tuple[str, ...]:
    if "reasoning_effort" not in source:
        return ()
    template = ChatTemplate(source)
    out = []
    for word in EFFORT_WORDS:
        try:
            template.render(_PROBE, enable_thinking=True, extra={"reasoning_effort": word})
        except errors.InvalidModelError:
            continue  # the template refuses this one (Qwen3.8's raises on anything else)
        out.append(word)
    return tuple(out)


def reasoning_efforts(template: ChatTemplate) -> tuple[str, ...]:
    """The `reasoning_effort` values the template takes, learnt by rendering each word of
    `EFFORT_WORDS`; () when its text never mentions `reasoning_effort`."""
    return _efforts(template.source)


def check_effort(template: ChatTemplate, effort: str, model: str) -> str:
    """`effort` (any case) if the template takes it, else a one-line `UsageError` that says
    what the model takes, or that it has no reasoning effort setting at all."""
    efforts = reasoning_efforts(template)
    if not efforts:
        raise errors.UsageError(
            f"{model} has no reasoning effort setting (its chat template takes none)",
            hint="reasoning effort is for models such as Qwen3.8-Flash-Next",
        )
    word = effort.strip().lower()
    if word not in efforts:
        raise errors.UsageError(
            f"reasoning effort {effort!r} is not one {model} takes",
            hint=f"choose {', '.join(efforts)}",
        )
    return word


# --------------------------------------------------------------------------------------
# What the model supports, and its sampling presets


@dataclass(frozen=True)
class ModelProfile:
    name: str
    thinking: ThinkingKind
    presets: Mapping[str, SamplingParams]

    @property
    def default_mode(self) -> Mode:
        return "direct" if self.thinking == "direct" else "think"

    def supports(self, mode: Mode) -> bool:
        return self.thinking == "hybrid" or (mode == "think") == (self.thinking == "thinking")

    def describe_modes(self) -> str:
        if self.thinking == "hybrid":
            return "thinks or answers directly (/think, /nothink)"
        if self.thinking == "thinking":
            return "always thinks (/budget N caps it)"
        return "answers directly (no thinking mode)"


def presets_from_spec(spec: ModelSpec | None) -> dict[str, SamplingParams]:
    presets = dict(DEFAULT_PRESETS)
    if spec is not None:
        for mode, p in spec.presets.items():
            # Every setting of the sampling table the catalog's preset gives (the Coder
            # cards' repeat penalty included).
            presets[mode] = SamplingParams(
                **{
                    s.field: getattr(p, s.field)
                    for s in sampling.SAMPLER_SETTINGS
                    if hasattr(p, s.field)
                }
            )
    return presets


def match_catalog(metadata: Mapping[str, str]) -> ModelSpec | None:
    """The catalog entry a local GGUF names in its metadata, if any."""
    try:
        from qwenrun import catalog
    except ImportError:  # the catalog is optional at this layer: Qwen3's defaults apply
        return None

    for key in ("general.basename", "general.name"):
        name = metadata.get(key)
        if not name:
            continue
        try:
            return catalog.lookup(name)
        except errors.ModelNotFoundError:
            continue  # a fine-tune or an unknown name: try the next key, then defaults
    return None


def model_profile(template: ChatTemplate, name: str, spec: ModelSpec | None = None) -> ModelProfile:
    display = spec.display if spec is not None else name
    return ModelProfile(display, detect_thinking_kind(template), presets_from_spec(spec))
