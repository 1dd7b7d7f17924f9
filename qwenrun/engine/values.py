"""Plain values the engine hands the rest of qwenrun: sampling settings, what a generation
did, what the prompt caches hold, a model's metadata.

Contract: frozen dataclasses, no llama.cpp, no I/O. `SamplingParams` is what the sampler chain
is built from (`engine/sampler.py`); `GenStats` is one generation's counts and speeds, with
the prompt tokens reused and from where; `CacheReport` is what `/stats` shows of the
checkpoints and the disk cache; `Reuse` is how much of a prompt the context already held;
`ModelMeta` is what the engine reads of a GGUF's metadata at load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qwenrun.engine import promptcache


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    # Never end early: end-of-generation tokens get a logit of -inf (`qwenrun bench` decodes
    # a fixed number of tokens whatever the model would say).
    ban_eog: bool = False


@dataclass(frozen=True)
class GenStats:
    prompt_tokens: int
    eval_prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_wall_ms: float
    llama_eval_ms: float
    llama_sample_ms: float
    # Prompt tokens not evaluated, and where they came from: "cache" (the context still
    # held them), "checkpoint" (a hybrid's checkpoint restored), "disk" (the prompt cache).
    reused_tokens: int = 0
    reused_from: str = ""
    reuse_ms: float = 0.0  # restoring them (a disk read): not counted in prefill_tok_s

    def as_dict(self) -> dict[str, float | int | str]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CacheReport:
    """What the engine keeps to avoid evaluating prompts again (for `/stats`)."""

    checkpoints: bool  # a hybrid model: checkpoints are taken (attention-only: not needed)
    checkpoint_count: int
    checkpoint_bytes: int
    checkpoint_max_count: int
    checkpoint_max_bytes: int
    disk: promptcache.DiskReport | None  # None: the prompt cache is off


@dataclass(frozen=True)
class Reuse:
    """How much of a prompt the context holds before evaluating it, and from where."""

    n_tokens: int
    source: str  # "", "cache", "checkpoint", "disk"
    seconds: float = 0.0  # spent restoring them (reading the disk cache): not prefill


@dataclass(frozen=True)
class ModelMeta:
    path: str
    arch: str
    n_layer: int
    n_ctx_train: int
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    is_recurrent: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
