"""The thinking splitter and budget: tables of whole outputs, cut into pieces every way."""

from __future__ import annotations

import itertools

import pytest

from qwenrun.thinking import (
    BARE_CLOSE,
    WRAP_UP,
    Answer,
    Thinking,
    ThinkingBudget,
    ThinkSplitter,
    prompt_opens_thinking,
    split_text,
)

# (name, output text, prompt opened <think>, expected thinking, expected answer)
CASES = [
    (
        "hybrid thinking",
        "<think>\nLet me see.\n</think>\n\nHi there.",
        False,
        "Let me see.",
        "Hi there.",
    ),
    ("no block", "Hello world", False, "", "Hello world"),
    ("no block, leading newline", "\n\nHello", False, "", "Hello"),
    ("empty thinking", "<think>\n\n</think>\n\nAnswer", False, "", "Answer"),
    ("empty thinking, no gaps", "<think></think>Answer", False, "", "Answer"),
    ("prompt opened it", "I should greet.\n</think>\n\nHello!", True, "I should greet.", "Hello!"),
    ("prompt opened, model repeats <think>", "<think>\nhmm\n</think>\n\nok", True, "hmm", "ok"),
    ("prompt opened, empty", "</think>\n\nok", True, "", "ok"),
    ("spaces after </think>", "<think>a b</think>   \n \t answer  ", False, "a b", "answer  "),
    (
        "multi-line thinking",
        "<think>\nline 1\n\nline 2\n</think>\n\nA\nB",
        False,
        "line 1\n\nline 2",
        "A\nB",
    ),
    ("unclosed thinking", "<think>\nstill going", False, "still going", ""),
    ("thinking-only, cut off", "going on and on", True, "going on and on", ""),
    ("lookalike tag in answer", "a <thinking> b", False, "", "a <thinking> b"),
    ("answer starting with <", "<b>bold</b>", False, "", "<b>bold</b>"),
    (
        "< inside thinking",
        "<think>x < y and a </thin b</think>\nz",
        False,
        "x < y and a </thin b",
        "z",
    ),
    (
        "<think> later in the answer is text",
        "Hi <think>no</think>",
        False,
        "",
        "Hi <think>no</think>",
    ),
    ("partial open tag at end", "<thi", False, "", "<thi"),
    ("unicode", "<think>é → ü</think>\n\n日本語", False, "é → ü", "日本語"),
    ("empty output", "", False, "", ""),
    ("empty output, prompt opened", "", True, "", ""),
]


def _run(pieces: list[str], in_thinking: bool) -> list[Thinking | Answer]:
    splitter = ThinkSplitter(in_thinking=in_thinking)
    events: list[Thinking | Answer] = []
    for piece in pieces:
        events += splitter.feed(piece)
    return events + splitter.flush()


def _check(events: list[Thinking | Answer], thinking: str, answer: str) -> None:
    got_thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    got_answer = "".join(e.text for e in events if isinstance(e, Answer))
    assert (got_thinking, got_answer) == (thinking, answer)
    assert all(e.text for e in events), "no empty events"
    kinds = [type(e) for e in events]
    # Thinking never comes back once the answer has started.
    assert kinds == sorted(kinds, key=lambda k: k is Answer)


@pytest.mark.parametrize(
    ("name", "text", "opened", "thinking", "answer"), CASES, ids=[c[0] for c in CASES]
)
def test_whole_text(name, text, opened, thinking, answer):
    _check(_run([text], opened), thinking, answer)
    assert split_text(text, in_thinking=opened) == (thinking, answer)


@pytest.mark.parametrize(
    ("name", "text", "opened", "thinking", "answer"), CASES, ids=[c[0] for c in CASES]
)
def test_split_at_every_position(name, text, opened, thinking, answer):
    for i in range(len(text) + 1):
        _check(_run([text[:i], text[i:]], opened), thinking, answer)


@pytest.mark.parametrize(
    ("name", "text", "opened", "thinking", "answer"), CASES, ids=[c[0] for c in CASES]
)
def test_one_character_at_a_time(name, text, opened, thinking, answer):
    _check(_run(list(text), opened), thinking, answer)


def test_every_three_way_cut_of_the_tags():
    text = "<think>\nab\n</think>\n\ncd"
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        _check(_run([text[:i], text[i:j], text[j:]], False), "ab", "cd")


def test_thinking_streams_before_the_close_tag_arrives():
    splitter = ThinkSplitter()
    assert splitter.feed("<think>\nFirst") == [Thinking("First")]
    assert splitter.in_thinking
    # Trailing whitespace and a partial close tag are held back, not shown as thinking.
    assert splitter.feed(" thought\n</th") == [Thinking(" thought")]
    assert splitter.feed("ink>\n\nAns") == [Answer("Ans")]
    assert not splitter.in_thinking
    assert splitter.feed("wer") == [Answer("wer")]


def test_held_back_whitespace_inside_thinking_is_kept_when_more_text_follows():
    splitter = ThinkSplitter(in_thinking=True)
    assert splitter.feed("a\n") == [Thinking("a")]
    assert splitter.feed("\nb") == [Thinking("\n\nb")]


def test_answer_only_output_streams_at_once():
    splitter = ThinkSplitter()
    assert splitter.feed("Hel") == [Answer("Hel")]
    assert splitter.feed("lo") == [Answer("lo")]
    assert not splitter.saw_thinking


def test_a_possible_open_tag_waits():
    splitter = ThinkSplitter()
    assert splitter.feed("  <th") == []
    assert splitter.feed("ink>x") == [Thinking("x")]
    assert splitter.saw_thinking


@pytest.mark.parametrize(
    ("prompt", "opened"),
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        # An earlier turn's closed block does not count; only the generation prompt does.
        (
            "<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        (
            "<|im_start|>assistant\n<think>\nx</think>y<|im_end|>\n<|im_start|>assistant\n<think>\n",
            True,
        ),
    ],
)
def test_prompt_opens_thinking(prompt, opened):
    assert prompt_opens_thinking(prompt) is opened


# ---- budget


def test_budget_fires_once_at_the_limit_with_qwens_wrap_up():
    budget = ThinkingBudget(limit=5)
    assert [budget.step(True, n) for n in range(5)] == [None] * 5
    assert budget.step(True, 5) == WRAP_UP
    assert WRAP_UP.rstrip().endswith("</think>")
    assert budget.step(True, 6) is None


def test_budget_ignores_tokens_outside_thinking():
    budget = ThinkingBudget(limit=2)
    assert budget.step(False, 50) is None
    assert budget.step(True, 2) is not None


def test_zero_budget_closes_at_once_without_words():
    budget = ThinkingBudget(limit=0)
    assert budget.step(True, 0) == BARE_CLOSE
    assert BARE_CLOSE.strip() == "</think>"


def test_no_budget_never_fires_without_a_token_cap():
    budget = ThinkingBudget()
    assert all(budget.step(True, n) is None for n in range(0, 100_000, 997))


def test_token_cap_keeps_room_for_the_answer():
    # max_tokens 100: thinking is closed at 75, leaving a quarter for the answer.
    budget = ThinkingBudget(max_tokens=100)
    assert budget.step(True, 74) is None
    assert budget.step(True, 75) == BARE_CLOSE
    # A large cap keeps at most 1024 tokens back.
    assert ThinkingBudget(max_tokens=40_000).step(True, 40_000 - 1024) == BARE_CLOSE
    assert ThinkingBudget(max_tokens=40_000).step(True, 40_000 - 1025) is None


def test_user_budget_below_the_cap_wins():
    budget = ThinkingBudget(limit=10, max_tokens=100)
    assert budget.step(True, 10) == WRAP_UP


def test_the_close_is_forced_early_enough_to_end_before_the_answers_quarter():
    # A close of 4 tokens under a cap of 100: forced at 71, it ends at 75, where the answer's
    # 25 tokens begin. `generated` counts the whole output (a model that wrote <think> first).
    budget = ThinkingBudget(max_tokens=100)
    assert budget.step(True, 60, generated=70, cost=lambda _text: 4) is None
    assert budget.step(True, 61, generated=71, cost=lambda _text: 4) == BARE_CLOSE


def test_a_wrap_up_that_would_not_end_before_the_answers_quarter_is_a_bare_close():
    cost = {WRAP_UP: 50, BARE_CLOSE: 3}.__getitem__
    assert ThinkingBudget(limit=10, max_tokens=100).step(True, 10, cost=cost) == WRAP_UP
    assert ThinkingBudget(limit=30, max_tokens=100).step(True, 30, cost=cost) == BARE_CLOSE


def test_negative_budget_is_refused():
    with pytest.raises(ValueError):
        ThinkingBudget(limit=-1)


def test_forced_close_text_splits_back_into_an_answer():
    # What the budget forces must itself end the thinking part when it streams back.
    splitter = ThinkSplitter(in_thinking=True)
    events = splitter.feed("pondering") + splitter.feed(WRAP_UP) + splitter.feed("Done.")
    thinking = "".join(e.text for e in events if isinstance(e, Thinking))
    assert thinking.startswith("pondering") and "limited time" in thinking
    assert [e for e in events if isinstance(e, Answer)] == [Answer("Done.")]
