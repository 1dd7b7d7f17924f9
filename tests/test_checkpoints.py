"""Checkpoints for the hybrid models: chat turns evaluate only what is new, on real llama.cpp.

The tiny hybrids (qwen35moe, qwen3next) have the real recurrent layers (Gated DeltaNet), so
llama.cpp refuses to trim their context exactly as it does for Qwen3.5-35B-A3B; the
attention-only archs (qwen3, qwen3moe) keep plain prefix reuse.
"""

from __future__ import annotations

import io

import pytest

from qwenrun import chat
from qwenrun.engine.checkpoints import (
    LONG_SPAN,
    TAIL_OFFSETS,
    ChatMarks,
    CheckpointStore,
    positions,
)
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.engine.values import SamplingParams
from qwenrun.synthetic.tiny_gguf import ARCHES, HYBRID_ARCHES
from qwenrun.ui import render, repl
from qwenrun.ui.prompt import ChatPrompt

QUESTIONS = (
    "Tell me a long story about a cat.",
    "And another one about a dog.",
    "Third question here please.",
    "Fourth, and shorter.",
)

# ---- where checkpoints go (pure)

IM, A, NL = 900, 901, 10
MARKS = ChatMarks(IM, (A, NL))


def chat_prompt(*tail: int) -> list[int]:
    """system message, user message, then the generation prompt and `tail` (the think tags)."""
    system = [IM, 5, NL, 6, 6, 6, 7]
    user = [IM, 8, NL, 9, 9, 9, 9, 7, NL]
    return [*system, *user, IM, A, NL, *tail]


def test_checkpoints_go_after_the_generation_prompt_and_at_the_last_user_message():
    prompt = chat_prompt(300, NL)  # Qwen3.5 with thinking on: `<think>\n` follows
    assistant_end = len(prompt) - 2
    user_start = 7
    assert positions(prompt, 0, MARKS) == [user_start, assistant_end]
    # Only positions inside the part being evaluated.
    assert positions(prompt, user_start, MARKS) == [assistant_end]
    assert positions(prompt, assistant_end, MARKS) == []


def test_a_prompt_ending_at_the_generation_prompt_keeps_its_last_token_to_evaluate():
    # Qwen3 with thinking on ends with `assistant\n`: the checkpoint goes one token earlier,
    # so that the same prompt sent again still finds it (a state holds no logits).
    prompt = chat_prompt()
    assert positions(prompt, 0, MARKS)[-1] == len(prompt) - 1


def test_without_chat_markers_the_checkpoint_goes_four_tokens_before_the_end():
    prompt = list(range(40))
    assert positions(prompt, 0, None) == [36]
    assert positions(prompt, 0, ChatMarks(999, (A,))) == [36]


def test_a_long_evaluation_also_gets_checkpoints_before_its_end():
    prompt = [IM, 8, NL] + [50] * (LONG_SPAN + 2500) + [7, NL, IM, A, NL, 300, NL]
    end = len(prompt) - 2
    # (The user message starts at 0, which is no checkpoint: nothing would be kept.)
    tail = sorted(end - d for d in TAIL_OFFSETS if end - d > 0)
    assert positions(prompt, 0, MARKS) == [*tail, end]
    # A short evaluation at the end of the same prompt gets only the usual one.
    assert positions(prompt, end - 40, MARKS) == [end]


def test_the_store_keeps_the_latest_positions_within_its_caps():
    store = CheckpointStore(max_count=3, max_bytes=1 << 20)
    for n in (10, 20, 30, 40):
        store.add(n, bytearray(100))
    assert [c.n_tokens for c in store.items] == [20, 30, 40]
    assert store.best(35) is not None and store.best(35).n_tokens == 30  # type: ignore[union-attr]
    assert store.best(19) is None
    by_bytes = CheckpointStore(max_count=8, max_bytes=250)
    for n in (10, 20, 30):
        by_bytes.add(n, bytearray(100))
    assert [c.n_tokens for c in by_bytes.items] == [20, 30] and by_bytes.bytes == 200
    store.drop_after(30)
    assert [c.n_tokens for c in store.items] == [20, 30]
    off = CheckpointStore(max_count=0)
    off.add(5, bytearray(10))
    assert not off.enabled and off.count == 0


# ---- chat turns on the real engine


@pytest.fixture(scope="module")
def models(tiny_models):
    # Qwen3.5's template for every arch: its prompt opens <think>, so with thinking on a tiny
    # model thinks (steer=2 bans the special tokens, so no model could open it by itself)
    # and the next turn drops that thinking from the history.
    return {a: tiny_models(a, steer=2, chat_template="qwen3.5", name=f"ck-{a}") for a in ARCHES}


def load(path, checkpoints: bool = True) -> Engine:
    engine = Engine.load(path, LoadConfig(n_ctx=2048, prompt_cache=0))
    if not checkpoints:
        engine.checkpoints.max_count = 0
    return engine


def quiet() -> render.PlainRenderer:
    return render.PlainRenderer(out=io.StringIO(), err=io.StringIO())


def conversation(engine: Engine, mode: str = "think") -> chat.Conversation:
    # Greedy; the cap leaves thinking a few dozen tokens, then closes it and answers.
    return chat.Conversation.for_engine(
        engine, mode=mode, settings={"temperature": 0, "max_tokens": 40}
    )


def talk(engine: Engine, conv: chat.Conversation, questions=QUESTIONS):
    """Each turn as the REPL runs it; per turn: (stats, new tokens, what was said)."""
    turns = []
    for q in questions:
        prepared = conv.prepare(engine, q)
        # New: the tokens after what the context holds (the last prompt token is always
        # evaluated again, for its logits).
        held = min(engine.common_prefix(prepared.tokens), len(prepared.tokens) - 1)
        diverged = held < engine.cached_tokens
        result = chat.run_turn(engine, conv, quiet(), q)
        assert result.stats is not None
        turns.append((result.stats, len(prepared.tokens) - held, diverged, result))
    return turns


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_each_chat_turn_evaluates_only_its_new_tokens(models, arch):
    engine = load(models[arch])
    try:
        turns = talk(engine, conversation(engine))
        report = engine.cache_report()
    finally:
        engine.close()
    first = turns[0][0]
    assert first.eval_prompt_tokens == first.prompt_tokens and first.reused_tokens == 0
    for stats, new, diverged, result in turns[1:]:
        assert result.thinking  # there was thinking to drop from the history
        # The previous answer's thinking is not in this prompt: it leaves the context early.
        assert diverged
        assert stats.eval_prompt_tokens == new
        assert stats.reused_tokens == stats.prompt_tokens - new > 0
        assert stats.reused_from == ("checkpoint" if arch in HYBRID_ARCHES else "cache")
    if arch in HYBRID_ARCHES:
        assert 0 < report.checkpoint_count <= report.checkpoint_max_count
        assert report.checkpoint_bytes > 0
    else:
        assert not report.checkpoints and report.checkpoint_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHES)
def test_direct_mode_turns_too(models, arch):
    # Direct mode: the prompt ends with `<think>\n\n</think>\n\n`, which history drops.
    engine = load(models[arch])
    try:
        turns = talk(engine, conversation(engine, "direct"), QUESTIONS[:3])
    finally:
        engine.close()
    for stats, new, diverged, _ in turns[1:]:
        assert diverged and stats.eval_prompt_tokens == new
        assert stats.reused_from == "checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_answers_are_the_same_with_and_without_checkpoints(models, arch):
    said = {}
    evaluated = {}
    for with_checkpoints in (True, False):
        engine = load(models[arch], with_checkpoints)
        try:
            turns = talk(engine, conversation(engine))
        finally:
            engine.close()
        said[with_checkpoints] = [(r.thinking, r.answer) for _, _, _, r in turns]
        evaluated[with_checkpoints] = [s.eval_prompt_tokens for s, _, _, _ in turns]
    assert said[True] == said[False]
    if arch in HYBRID_ARCHES:
        # Without checkpoints a hybrid evaluates each whole prompt again (the old behaviour).
        assert sum(evaluated[False]) > 2 * sum(evaluated[True])


def greedy(engine: Engine, prompt: list[int], n: int = 12):
    gen = engine.generate(prompt, SamplingParams(temperature=0), n)
    text = gen.text()
    assert gen.stats is not None
    return text, gen.stats


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHES)
def test_the_same_prompt_again_and_an_edited_last_message(models, arch):
    engine = load(models[arch])
    fresh = load(models[arch])
    try:
        conv = chat.Conversation.for_engine(engine, system="Be brief.")
        first = engine.tokenize(conv.render("What is a cat?"))
        edited = engine.tokenize(conv.render("What is a dog?"))
        starts = [i for i, t in enumerate(first) if t == first[0]]  # `<|im_start|>`
        text, _ = greedy(engine, first)
        # Regenerate: the same prompt restarts from the checkpoint after `assistant\n`.
        again, stats = greedy(engine, first)
        assert again == text
        assert stats.reused_from == "checkpoint" and stats.eval_prompt_tokens <= 2
        # An edited last message restarts from the checkpoint at its start.
        got, stats = greedy(engine, edited)
        assert stats.reused_from == "checkpoint" and stats.reused_tokens == starts[-2]
        fresh_text, fresh_stats = greedy(fresh, edited)
        assert got == fresh_text and fresh_stats.eval_prompt_tokens == len(edited)
    finally:
        engine.close()
        fresh.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHES)
def test_no_usable_checkpoint_means_a_full_and_correct_evaluation(models, arch):
    engine = load(models[arch])
    fresh = load(models[arch])
    try:
        a = engine.tokenize(chat.Conversation.for_engine(engine, system="One.").render("hi"))
        b = engine.tokenize(chat.Conversation.for_engine(engine, system="Two.").render("hi"))
        greedy(engine, a)
        text, stats = greedy(engine, b)  # differs before the first checkpoint
        assert stats.reused_tokens == 0 and stats.eval_prompt_tokens == len(b)
        assert text == greedy(fresh, b)[0]
        # A checkpoint llama.cpp refuses (damaged here) clears the context: full evaluation.
        greedy(engine, a)
        for ckpt in engine.checkpoints.items:
            ckpt.data[:] = bytes(len(ckpt.data))
        text, stats = greedy(engine, a)
        assert stats.reused_tokens == 0 and stats.eval_prompt_tokens == len(a)
        assert text == greedy(fresh, a)[0]
    finally:
        engine.close()
        fresh.close()


@pytest.mark.slow
def test_stats_show_the_reuse_and_what_is_kept(models):
    engine = load(models["qwen35moe"])
    try:
        conv = conversation(engine)
        said: list[str] = []
        lines = io.StringIO("hello\nsecond\n/stats\n")
        loop = repl.Repl(
            engine,
            conv,
            quiet(),
            ChatPrompt(repl.COMMANDS, None, interactive=False, stdin=lines),
            say=said.append,
        )
        assert loop.run() == 0
    finally:
        engine.close()
    text = "\n".join(said)
    assert "prompt tokens from a checkpoint" in text
    assert "checkpoint 3 held" in text and "(at most 8, 1.0 GiB)" in text
    assert "disk cache off" in text
