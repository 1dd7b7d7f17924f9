"""The native sampler chain of one generation, built from `SamplingParams`.

Contract: `sampler_chain(s, n_vocab, eog_ids)` returns a llama.cpp sampler chain (through
`native.bindings()`; the caller frees it with `llama_sampler_free`): penalties when asked for,
a ban of every end-of-generation token when `ban_eog` (bench decodes a fixed number of
tokens), then greedy at temperature 0, else top-k, top-p, min-p, temperature and a seeded
draw, in llama.cpp's usual order. Nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwenrun.engine.native import bindings
from qwenrun.engine.values import SamplingParams


def _eog_ban(n_vocab: int, eog: Sequence[int]) -> Any:
    """A logit-bias sampler that rules out every end-of-generation token."""
    lc = bindings()
    biases = (lc.llama_logit_bias * len(eog))(*((t, float("-inf")) for t in eog))
    return lc.llama_sampler_init_logit_bias(n_vocab, len(eog), biases)


def sampler_chain(s: SamplingParams, n_vocab: int, eog_ids: Sequence[int]) -> Any:
    """The chain for `s` (see the module docstring)."""
    lc = bindings()
    sp = lc.llama_sampler_chain_default_params()
    sp.no_perf = False
    chain = lc.llama_sampler_chain_init(sp)
    add = lc.llama_sampler_chain_add
    if s.repeat_penalty != 1.0 or s.presence_penalty != 0.0:
        # This build's llama.cpp takes the vocabulary size first (llama.h of 0.3.36).
        penalties = lc.llama_sampler_init_penalties(
            n_vocab, 64, s.repeat_penalty, 0.0, s.presence_penalty
        )
        add(chain, penalties)
    if s.ban_eog:
        add(chain, _eog_ban(n_vocab, eog_ids))
    if s.temperature <= 0:
        add(chain, lc.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(chain, lc.llama_sampler_init_top_k(s.top_k))
    if 0 < s.top_p < 1:
        add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        add(chain, lc.llama_sampler_init_min_p(s.min_p, 1))
    add(chain, lc.llama_sampler_init_temp(s.temperature))
    seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
    add(chain, lc.llama_sampler_init_dist(seed))
    return chain
