"""Conversations: Qwen's real templates, modes, transcripts, and turns on the real engine."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from qwenrun import chat, errors
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.sampling import format_number
from qwenrun.synthetic.tiny_gguf import template_text
from qwenrun.template import ChatTemplate, model_profile
from qwenrun.thinking import BARE_CLOSE, WRAP_UP
from qwenrun.transcript import Turn
from qwenrun.ui import render, repl
from qwenrun.ui.prompt import ChatPrompt

GEN_PROMPT = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Qwen3-*-Thinking-2507 style: the generation prompt always opens the block.
THINKING_ONLY = template_text("qwen3").replace(
    "{{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}",
    "{{- '<|im_start|>assistant\\n<think>\\n' }}",
)


def conversation(name: str, **kw: object) -> chat.Conversation:
    template = ChatTemplate(template_text(name) if "{" not in name else name)
    return chat.Conversation(template, model_profile(template, "m"), **kw)  # type: ignore[arg-type]


# ---- templates and modes (no engine)


def test_thinking_only_fixture_really_differs_from_qwen3():
    assert template_text("qwen3") != THINKING_ONLY
    assert "enable_thinking" not in THINKING_ONLY.split("add_generation_prompt")[-1]


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("qwen3", "hybrid"),
        ("qwen3.5", "hybrid"),
        ("qwen3-coder", "direct"),
        (THINKING_ONLY, "thinking"),
    ],
    ids=["qwen3", "qwen3.5", "coder", "thinking-only"],
)
def test_thinking_kind_is_read_from_the_template(template, kind):
    conv = conversation(template)
    assert conv.profile.thinking == kind
    assert conv.mode == ("direct" if kind == "direct" else "think")


def test_qwen3_prompt_carries_enable_thinking_per_turn():
    conv = conversation("qwen3", system="Be brief.")
    assert conv.render("hi").endswith(GEN_PROMPT)
    conv.set_mode("direct")
    assert conv.render("hi").endswith(GEN_PROMPT + EMPTY_THINK)
    conv.set_mode("think")
    assert conv.render("hi").endswith(GEN_PROMPT)
    assert conv.render("hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_qwen35_prompt_opens_thinking_itself():
    conv = conversation("qwen3.5")
    assert conv.render("hi").endswith(GEN_PROMPT + "<think>\n")
    conv.set_mode("direct")
    assert conv.render("hi").endswith(GEN_PROMPT + EMPTY_THINK)


@pytest.mark.parametrize("name", ["qwen3", "qwen3.5"])
def test_thinking_is_not_sent_back(name):
    conv = conversation(name)
    conv.add_turn(Turn("first?", "the visible answer", thinking="SECRET-THOUGHT", mode="think"))
    prompt = conv.render("second?")
    assert "the visible answer" in prompt
    assert "SECRET-THOUGHT" not in prompt
    assert prompt.count("<think>") <= 1  # only the generation prompt's own, if any


def test_direct_only_model_refuses_thinking_and_says_so():
    conv = conversation("qwen3-coder")
    with pytest.raises(errors.UsageError, match="no thinking mode"):
        conv.set_mode("think")
    assert conv.mode == "direct"
    assert "answers directly" in conv.profile.describe_modes()


def test_thinking_only_model_refuses_direct_and_points_to_budget():
    conv = conversation(THINKING_ONLY)
    with pytest.raises(errors.UsageError, match="always thinks") as info:
        conv.set_mode("direct")
    assert "budget 0" in (info.value.hint or "")


def test_template_environment_matches_llama_cpp():
    source = (
        "{{ messages[0].content | tojson }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    template = ChatTemplate(source)
    out = template.render(
        [{"role": "user", "content": "héllo <b>"}, {"role": "user", "content": "two"}],
        enable_thinking=True,
    )
    first, year, rest = out.split("|")
    assert first == '"héllo <b>"'  # non-ASCII and markup kept, as llama.cpp's tojson does
    assert year.isdigit() and len(year) == 4
    assert rest == "two"


def test_template_errors_are_model_errors():
    template = ChatTemplate("{{ raise_exception('No user query found') }}")
    with pytest.raises(errors.InvalidModelError, match="No user query found"):
        template.render([], enable_thinking=True)
    with pytest.raises(errors.InvalidModelError, match="does not parse"):
        ChatTemplate("{% if %}")


def test_sandbox_blocks_unsafe_templates():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(errors.InvalidModelError):
        template.render([{"role": "user", "content": "x"}], enable_thinking=True)


# ---- sampling settings


def test_sampling_preset_follows_the_mode_and_settings_override_it():
    conv = conversation("qwen3")
    assert conv.sampling().temperature == 0.6 and conv.sampling().top_p == 0.95
    conv.set_mode("direct")
    assert conv.sampling().temperature == 0.7 and conv.sampling().top_p == 0.8
    conv.set("temp", "0.3")
    conv.set("top-k", "5")
    conv.set("max-tokens", "64")
    assert (conv.sampling().temperature, conv.sampling().top_k) == (0.3, 5)
    assert conv.sampling("think").temperature == 0.3  # user settings hold in both modes
    assert conv.max_tokens == 64


def test_settings_accept_field_names_from_the_command_line():
    conv = conversation("qwen3", settings={"temperature": 0.2, "top_p": 0.5, "max_tokens": 9})
    assert (conv.sampling().temperature, conv.sampling().top_p, conv.max_tokens) == (0.2, 0.5, 9)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temp", "hot", "number"),
        ("top-k", "2.5", "whole number"),
        ("top-k", 2.5, "whole number"),
        ("top-p", "1.5", "between"),
        ("max-tokens", "0", "between"),
        ("colour", "blue", "unknown setting"),
    ],
)
def test_bad_settings_are_usage_errors(key, value, message):
    with pytest.raises(errors.UsageError, match=message):
        conversation("qwen3").set(key, value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # Limits as people write them: not "1e+07" or "4.29497e+09".
        ("max-tokens", "0", "max-tokens must be between 1 and 10,000,000, not 0"),
        ("max_tokens", 20_000_000, "max-tokens must be between 1 and 10,000,000, not 20,000,000"),
        ("seed", 2**32, "seed must be between -1 and 4,294,967,295, not 4,294,967,296"),
        ("top-k", "2000000", "top-k must be between 0 and 1,000,000, not 2000000"),
        ("temp", "9", "temp must be between 0.0 and 5.0, not 9"),
        ("temperature", 1e-7 + 5, "temp must be between 0.0 and 5.0, not 5.0000001"),
        ("presence-penalty", -3.0, "presence-penalty must be between -2.0 and 2.0, not -3.0"),
    ],
)
def test_range_errors_write_numbers_as_people_do(key, value, message):
    with pytest.raises(errors.UsageError) as caught:
        conversation("qwen3").set(key, value)
    assert caught.value.message == message
    assert "e+" not in caught.value.message


def test_format_number_never_writes_an_exponent():
    assert [format_number(x) for x in (10_000_000, 2**32 - 1, 0, -2)] == [
        "10,000,000",
        "4,294,967,295",
        "0",
        "-2",
    ]
    assert [format_number(x) for x in (0.0, 5.0, 0.95, 1e-05, 1e16, -2.0)] == [
        "0.0",
        "5.0",
        "0.95",
        "0.00001",
        "10,000,000,000,000,000.0",
        "-2.0",
    ]


# ---- transcripts


def test_transcript_round_trip(tmp_path: Path):
    conv = conversation("qwen3", system="Sys", budget=50, settings={"temp": 0.4})
    conv.add_turn(Turn("q1", "a1", thinking="t1", mode="think"))
    conv.set_mode("direct")
    conv.add_turn(Turn("q2 é", "a2 cut", mode="direct", cut=True))
    path = tmp_path / "chat.json"
    conv.save(path)
    doc = json.loads(path.read_text("utf-8"))
    assert doc["messages"][3] == {
        "role": "assistant",
        "content": "a2 cut",
        "mode": "direct",
        "cut": True,
    }
    assert doc["messages"][1]["thinking"] == "t1"

    other = conversation("qwen3")
    assert other.load(path) == []
    assert other.system == "Sys" and other.budget == 50 and other.mode == "direct"
    assert other.sampling().temperature == 0.4
    assert [(t.user, t.answer, t.thinking, t.cut) for t in other.turns] == [
        ("q1", "a1", "t1", False),
        ("q2 é", "a2 cut", "", True),
    ]
    assert other.render("q3") == conv.render("q3")


def test_loading_a_thinking_transcript_into_a_direct_model_keeps_direct_mode(tmp_path: Path):
    conv = conversation("qwen3")
    conv.add_turn(Turn("q", "a", mode="think"))
    conv.save(tmp_path / "t.json")
    coder = conversation("qwen3-coder")
    notes = coder.load(tmp_path / "t.json")
    assert coder.mode == "direct" and len(coder.turns) == 1
    assert any("no think mode" in n for n in notes)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a JSON transcript"),
        pytest.param("[" * 100_000, "nested too deeply", id="deeply-nested"),
        pytest.param("\xff\xfe", "not UTF-8 text", id="not-utf-8"),
        ('{"x": 1}', "no messages"),
        (
            '{"messages": [{"role": "assistant", "content": "a"},'
            ' {"role": "user", "content": "q"}]}',
            "message 1 is an answer with no user message before it",
        ),
    ],
)
def test_bad_transcripts_are_usage_errors(tmp_path: Path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("latin-1"))  # byte for byte: "\xff" is not UTF-8
    with pytest.raises(errors.UsageError, match=message):
        conversation("qwen3").load(path)
    with pytest.raises(errors.UsageError, match="no such transcript"):
        conversation("qwen3").load(tmp_path / "missing.json")


def a_conversation_with_history() -> chat.Conversation:
    conv = conversation("qwen3", system="Keep me", budget=9, settings={"temp": 0.3, "seed": 4})
    conv.add_turn(Turn("q1", "a1", thinking="t1", mode="think"))
    conv.set_mode("direct")
    return conv


def snapshot(conv: chat.Conversation) -> dict[str, Any]:
    doc = conv.to_json()
    del doc["saved"]
    return doc


GOOD_PAIR = '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}'


@pytest.mark.parametrize(
    ("messages", "extra", "message"),
    [
        ('[{"role": "user"}]', "", 'message 1 (user) has no "content" text'),
        ('[{"role": "user", "content": 5}]', "", 'message 1 (user) has no "content" text'),
        (f'[{GOOD_PAIR}, "hello"]', "", "message 3 is not an object"),
        ('[{"role": "bot", "content": "x"}]', "", "message 1 has role 'bot'"),
        (f'[{GOOD_PAIR}, {{"role": "user", "content": "q2"}}]', "", "the last message is a user"),
        (
            '[{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]',
            "",
            "message 2 follows user message 1, which has no answer",
        ),
        (
            '[{"role": "user", "content": "q"},'
            ' {"role": "assistant", "content": "a", "cut": "yes"}]',
            "",
            'message 2 has "cut" that is not true or false',
        ),
        (
            '[{"role": "user", "content": "q"},'
            ' {"role": "assistant", "content": "a", "mode": "fast"}]',
            "",
            "message 2 has mode 'fast'",
        ),
        (
            f'[{GOOD_PAIR}, {{"role": "system", "content": "late"}}, {GOOD_PAIR}]',
            "",
            "message 3 is a system message",
        ),
        # Fields after the messages used to fail after the conversation was already replaced.
        (f"[{GOOD_PAIR}]", ', "settings": {"temp": 99}', "temp must be between 0.0 and 5.0"),
        (f"[{GOOD_PAIR}]", ', "settings": {"top_k": "many"}', "setting top_k should be a number"),
        (f"[{GOOD_PAIR}]", ', "budget": -1', '"budget" should be a number of tokens'),
        (f"[{GOOD_PAIR}]", ', "system": ["x"]', '"system" should be text or null'),
        (f"[{GOOD_PAIR}]", ', "mode": "fast"', '"mode" should be "think" or "direct"'),
        (f"[{GOOD_PAIR}]", ', "format": "other/2"', "\"format\" is 'other/2'"),
    ],
)
def test_a_transcript_that_fails_validation_changes_nothing_and_says_where(
    tmp_path: Path, messages, extra, message
):
    path = tmp_path / "bad.json"
    path.write_text(f'{{"messages": {messages}{extra}}}', "utf-8")
    conv = a_conversation_with_history()
    before = snapshot(conv)
    with pytest.raises(errors.UsageError) as caught:
        conv.load(path)
    assert caught.value.message.startswith(f"{path}: ")
    assert message in caught.value.message
    assert snapshot(conv) == before


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("folder", "is a folder, not a transcript"),
        ("/dev/null", "is not a regular file"),
        ("file/x.json", "no such transcript"),
    ],
)
def test_loading_what_is_not_a_transcript_file_is_one_line(tmp_path: Path, where, message):
    (tmp_path / "file").write_text("{}")
    (tmp_path / "folder").mkdir()
    conv = a_conversation_with_history()
    before = snapshot(conv)
    with pytest.raises(errors.UsageError, match=message):
        conv.load(tmp_path / where)
    assert snapshot(conv) == before


def test_a_transcript_from_elsewhere_with_a_leading_system_message_loads(tmp_path: Path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "utf-8",
    )
    conv = a_conversation_with_history()
    assert conv.load(path) == []
    assert conv.system == "Be brief." and [(t.user, t.answer) for t in conv.turns] == [("q", "a")]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file/x.json", "is a file, not a folder"),
        ("folder", "it is a folder"),
        ("missing/deeper/x.json", "there is no folder"),
        ("/dev/null", "not a regular file"),
        ("/proc/x.json", "cannot save to /proc/x.json"),
    ],
)
def test_save_refuses_what_it_cannot_write_and_makes_no_folders(tmp_path: Path, where, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    target = tmp_path / where
    conv = a_conversation_with_history()
    with pytest.raises(errors.UsageError, match=message) as caught:
        conv.save(target)
    assert caught.value.hint
    assert not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no temp files


# Writes past 300 bytes fail (EFBIG) in this child, as a full disk would.
SAVE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from qwenrun import chat, errors
from qwenrun.template import ChatTemplate, model_profile
from qwenrun.transcript import Turn
from qwenrun.synthetic.tiny_gguf import template_text

template = ChatTemplate(template_text("qwen3"))
conv = chat.Conversation(template, model_profile(template, "m"))
conv.add_turn(Turn("q", "a long answer " * 100))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.RLIM_INFINITY))
try:
    conv.save(Path(sys.argv[1]))
except errors.UsageError as err:
    print(err.message)
"""


@pytest.mark.slow
def test_a_save_that_fails_midway_leaves_the_old_file_whole(tmp_path: Path):
    path = tmp_path / "chat.json"
    old = a_conversation_with_history()
    old.save(path)
    before = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_WITH_A_FILE_SIZE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cannot save to {path}: file too large")


def test_save_replaces_a_file_and_keeps_its_permissions(tmp_path: Path):
    path = tmp_path / "chat.json"
    path.write_text("old")
    path.chmod(0o600)
    a_conversation_with_history().save(path)
    assert json.loads(path.read_text("utf-8"))["system"] == "Keep me"
    assert path.stat().st_mode & 0o777 == 0o600


# ---- turns on the real engine


@pytest.fixture(scope="module")
def engines(tiny_models):
    """Engines on tiny models, loaded once per module, keyed by (template, n_ctx)."""
    made: dict[tuple[str, int], Engine] = {}

    def get(template: str = "qwen3", n_ctx: int = 1024) -> Engine:
        key = (template, n_ctx)
        if key not in made:
            path = tiny_models("qwen3moe", steer=2, chat_template=template, name=f"t-{template}")
            made[key] = Engine.load(path, LoadConfig(n_ctx=n_ctx))
        made[key].reset()
        return made[key]

    yield get
    for engine in made.values():
        engine.close()


def quiet() -> render.PlainRenderer:
    return render.PlainRenderer(out=io.StringIO(), err=io.StringIO())


def test_a_turn_streams_the_answer_and_is_recorded(engines):
    engine = engines("qwen3")
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 1, "max_tokens": 16}
    )
    out, err = io.StringIO(), io.StringIO()
    result = chat.run_turn(engine, conv, render.PlainRenderer(out=out, err=err), "hello")
    assert result.finish_reason == "length"  # steer=2 never stops by itself
    assert result.stats is not None and result.stats.generated_tokens == 16
    assert result.answer and out.getvalue() == result.answer + (
        "" if result.answer.endswith("\n") else "\n"
    )
    assert err.getvalue() == ""
    assert [(t.user, t.answer, t.mode) for t in conv.turns] == [("hello", result.answer, "direct")]


@pytest.mark.slow
def test_turn_two_evaluates_only_the_new_tokens(engines):
    # The coder template repeats history verbatim, so all of turn 1 is reused as it is held.
    engine = engines("qwen3-coder")
    conv = chat.Conversation.for_engine(
        engine, system="Be brief.", settings={"seed": 3, "max_tokens": 12}
    )
    first = chat.run_turn(engine, conv, quiet(), "hello there")
    second = chat.run_turn(engine, conv, quiet(), "and again")
    assert first.stats and second.stats
    new_text = "<|im_end|>\n<|im_start|>user\nand again<|im_end|>\n<|im_start|>assistant\n"
    # The one extra token: the last answer token, sampled but never fed back (max_tokens).
    assert second.stats.eval_prompt_tokens == len(engine.tokenize(new_text)) + 1
    assert second.stats.prompt_tokens == first.stats.prompt_tokens + 12 + len(
        engine.tokenize(new_text)
    )


def test_turn_two_with_qwen3_reuses_the_history_prefix(engines):
    # Qwen3's template drops the empty think block from history, so the last answer is
    # evaluated again, but nothing before it.
    engine = engines("qwen3")
    conv = chat.Conversation.for_engine(
        engine, system="S " * 40, mode="direct", settings={"seed": 3, "max_tokens": 12}
    )
    chat.run_turn(engine, conv, quiet(), "first question")
    head = conv.render("x").split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"
    second = chat.run_turn(engine, conv, quiet(), "second question")
    assert second.stats is not None
    # Evaluated: from the first answer on; the system prompt and first question are reused.
    assert second.stats.eval_prompt_tokens == second.stats.prompt_tokens - len(
        engine.tokenize(head)
    )


@pytest.mark.slow
def test_thinking_budget_closes_the_block_and_thinking_stays_out_of_the_next_prompt(engines):
    # Qwen3.5's prompt opens <think>; steer=2 never writes </think>, so only the budget ends it.
    engine = engines("qwen3.5")
    # The tiny vocabulary spells the wrap-up sentence nearly a byte per token: room for it.
    conv = chat.Conversation.for_engine(engine, budget=6, settings={"seed": 2, "max_tokens": 300})
    assert conv.mode == "think"
    out, err = io.StringIO(), io.StringIO()
    result = chat.run_turn(
        engine, conv, render.PlainRenderer(out=out, err=err, show_thinking=True), "q"
    )
    assert "limited time" in result.thinking  # Qwen's wrap-up sentence, then </think>
    assert result.answer.strip()
    assert 6 <= result.thinking_tokens <= 6 + len(engine.tokenize(WRAP_UP)) + 1
    assert out.getvalue().strip() == result.answer.strip()
    assert "limited time" in err.getvalue() and "limited time" not in out.getvalue()

    following = conv.render("next")
    assert result.answer.strip() in following
    assert (
        result.thinking.split()[0]
        not in following.split("<|im_start|>user\nnext")[0].split(GEN_PROMPT)[-1]
    )
    assert "limited time" not in following


@pytest.mark.slow
@pytest.mark.parametrize("max_tokens", [8, 12, 40])
def test_thinking_never_eats_the_answers_quarter_of_the_token_cap(engines, max_tokens):
    # steer=2 never writes </think>: only the cap's reserve ends the thinking. The forced
    # close is itself several tokens here (it used to be forced at the quarter's start, and
    # so ate the answer's share: at 8 or 12 tokens the answer was empty).
    engine = engines("qwen3.5")
    conv = chat.Conversation.for_engine(engine, settings={"seed": 2, "max_tokens": max_tokens})
    result = chat.run_turn(engine, conv, quiet(), "q")
    assert result.thinking and result.answer.strip(), (result.thinking, result.answer)
    assert result.stats is not None and result.stats.generated_tokens == max_tokens
    quarter = max(1, max_tokens // 4)
    # The close ends where the quarter begins: every token after it is the answer's.
    assert result.stats.generated_tokens - result.thinking_tokens >= quarter
    assert result.thinking_tokens >= max_tokens - quarter - len(engine.tokenize(BARE_CLOSE))


@pytest.mark.slow
def test_a_budgets_wrap_up_that_would_eat_the_answer_gives_way_to_the_bare_close(engines):
    engine = engines("qwen3.5")
    # Qwen's wrap-up sentence is spelled nearly a byte per token in the tiny vocabulary:
    # forced after 6 tokens of thinking, it alone would fill a cap of 60.
    assert len(engine.tokenize(WRAP_UP)) > 60
    conv = chat.Conversation.for_engine(engine, budget=6, settings={"seed": 2, "max_tokens": 60})
    result = chat.run_turn(engine, conv, quiet(), "q")
    assert result.answer.strip(), (result.thinking, result.answer)
    assert "limited time" not in result.thinking
    assert 6 <= result.thinking_tokens <= 6 + len(engine.tokenize(BARE_CLOSE))


def test_direct_mode_on_a_hybrid_has_no_thinking(engines):
    engine = engines("qwen3.5")
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 2, "max_tokens": 10}
    )
    result = chat.run_turn(engine, conv, quiet(), "q")
    assert result.thinking == "" and result.answer and result.thinking_tokens == 0


@pytest.mark.slow
def test_context_overflow_drops_the_oldest_turn_but_keeps_the_system_prompt(engines):
    engine = engines("qwen3", n_ctx=256)
    conv = chat.Conversation.for_engine(
        engine, system="SYSTEM-PROMPT", mode="direct", settings={"seed": 1, "max_tokens": 30}
    )
    err = io.StringIO()
    out = render.PlainRenderer(out=io.StringIO(), err=err)
    results = [
        chat.run_turn(engine, conv, out, f"question number {i} " + "x" * 60) for i in range(6)
    ]
    dropped = sum(r.dropped_turns for r in results)
    assert dropped >= 1
    assert "Context full: dropped the" in err.getvalue()
    prompt = conv.render("last")
    assert prompt.startswith("<|im_start|>system\nSYSTEM-PROMPT")
    assert "question number 0 " not in prompt
    assert "question number 5 " in prompt
    assert len(conv.turns) == 6 - dropped


def test_a_message_larger_than_the_context_is_refused(engines):
    engine = engines("qwen3", n_ctx=256)
    conv = chat.Conversation.for_engine(engine, mode="direct")
    with pytest.raises(errors.ContextOverflowError, match="context holds 256"):
        chat.run_turn(engine, conv, quiet(), "word " * 400)
    assert conv.turns == []


def test_a_message_too_large_for_the_context_leaves_the_history_alone(engines):
    engine = engines("qwen3", n_ctx=256)
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 1, "max_tokens": 8}
    )
    for i in range(2):
        chat.run_turn(engine, conv, quiet(), f"short question {i}")
    before = list(conv.turns)
    with pytest.raises(errors.ContextOverflowError, match="tokens, but the context holds 256"):
        chat.run_turn(engine, conv, quiet(), "word " * 400)
    assert conv.turns == before


@pytest.mark.slow
def test_a_turn_cancelled_before_any_token_leaves_no_empty_answer(engines):
    engine = engines("qwen3", n_ctx=512)
    conv = chat.Conversation.for_engine(engine, mode="direct", settings={"seed": 1})
    cancel = threading.Event()
    cancel.set()
    result = chat.run_turn(engine, conv, quiet(), "hello " * 50, cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.answer == ""
    assert conv.turns == []
    assert "<|im_start|>assistant\n<|im_end|>" not in conv.render("next")
    # The engine evaluated nothing it does not account for: the next turn works as usual.
    again = chat.run_turn(engine, conv, quiet(), "hello")
    assert again.finish_reason in ("stop", "length")
    assert len(conv.turns) == 1


class CancelAfter(render.PlainRenderer):
    """Sets the cancel event after `n` answer pieces, as Ctrl-C would."""

    def __init__(self, event: threading.Event, n: int) -> None:
        super().__init__(out=io.StringIO(), err=io.StringIO())
        self.event, self.n = event, n

    def answer(self, text: str) -> None:
        super().answer(text)
        self.n -= 1
        if self.n == 0:
            self.event.set()


@pytest.mark.slow
def test_cancel_keeps_what_streamed_marks_it_cut_and_the_chat_goes_on(engines):
    engine = engines("qwen3")
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 1, "max_tokens": 500}
    )
    cancel = threading.Event()
    renderer = CancelAfter(cancel, 5)
    result = chat.run_turn(engine, conv, renderer, "tell me", cancel=cancel)
    assert result.finish_reason == "cancelled" and result.cut
    assert result.stats is not None and result.stats.generated_tokens < 20
    assert conv.turns[-1].cut and conv.turns[-1].answer == result.answer
    assert isinstance(renderer.out, io.StringIO) and renderer.out.getvalue().startswith(
        result.answer
    )
    after = chat.run_turn(engine, conv, quiet(), "go on", cancel=threading.Event())
    assert after.finish_reason == "length" and len(conv.turns) == 2


def test_json_renderer_prints_one_object(engines):
    engine = engines("qwen3")
    conv = chat.Conversation.for_engine(engine, settings={"seed": 1, "max_tokens": 8})
    out = io.StringIO()
    renderer = render.JsonRenderer(out=out, extra={"placement": engine.placement.to_dict()})
    result = chat.run_turn(engine, conv, renderer, "hi")
    doc = json.loads(out.getvalue())
    assert doc["answer"] == result.answer and doc["thinking"] == result.thinking
    assert doc["stats"]["generated_tokens"] == 8
    assert set(doc["placement"]) >= {
        "n_gpu_layers",
        "cpu_moe_layers",
        "overridden_tensors",
        "buffers",
    }
    assert out.getvalue().count("\n") == 1


class InterruptAfter(render.PlainRenderer):
    """Sends this process a real SIGINT after `n` answer pieces."""

    def __init__(self, n: int) -> None:
        super().__init__(out=io.StringIO(), err=io.StringIO())
        self.n = n

    def answer(self, text: str) -> None:
        super().answer(text)
        self.n -= 1
        if self.n == 0:
            os.kill(os.getpid(), signal.SIGINT)


def test_one_shot_turns_sigint_into_a_clean_stop(engines):
    engine = engines("qwen3")
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 1, "max_tokens": 500}
    )
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        chat.one_shot(engine, conv, "tell me", InterruptAfter(3))
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert conv.turns[-1].cut
    assert conv.turns[-1].answer


# ---- the REPL loop, driven through piped input


def run_repl(engine: Engine, lines: str, conv: chat.Conversation | None = None):
    conv = conv or chat.Conversation.for_engine(engine, settings={"seed": 1, "max_tokens": 8})
    said: list[str] = []
    out = io.StringIO()
    prompt = ChatPrompt(repl.COMMANDS, None, interactive=False, stdin=io.StringIO(lines))
    loop = repl.Repl(
        engine, conv, render.PlainRenderer(out=out, err=io.StringIO()), prompt, say=said.append
    )
    code = loop.run()
    return code, conv, said, out.getvalue()


def test_repl_commands_change_the_conversation(engines, tmp_path: Path):
    engine = engines("qwen3")
    transcript = tmp_path / "t.json"
    script = "\n".join(
        [
            "/nothink",
            "hello",
            "/think",
            "/budget 7",
            "/set temp 0.25",
            "/set max-tokens 6",
            "/system You are terse.",
            "second",
            f"/save {transcript}",
            "/clear",
            f"/load {transcript}",
            "/stats",
            "/exit",
            "never read",
        ]
    )
    code, conv, said, out = run_repl(engine, script + "\n")
    assert code == 0
    assert out == "".join(t.answer + ("" if t.answer.endswith("\n") else "\n") for t in conv.turns)
    assert [t.mode for t in conv.turns] == ["direct", "think"]
    assert conv.budget == 7 and conv.sampling().temperature == 0.25 and conv.max_tokens == 6
    assert conv.system == "You are terse."
    assert any("Saved 2 turns" in s for s in said) and any("Loaded 2 turns" in s for s in said)
    stats = "\n".join(said)
    assert "2 answers" in stats and "temp 0.25" in stats and "evaluated" in stats
    assert "never read" not in [t.user for t in conv.turns]


def context_in_use(said: list[str]) -> list[int]:
    return [
        int(m.group(1).replace(",", ""))
        for line in said
        if (m := re.match(r"context\s+([\d,]+) of [\d,]+ tokens", line))
    ]


def test_stats_after_clear_and_load_show_the_context_the_conversation_takes(engines, tmp_path):
    engine = engines("qwen3")
    transcript = tmp_path / "t.json"
    lines = ["hello", "second", "/stats", f"/save {transcript}", "/clear", "/stats"]
    script = "\n".join([*lines, f"/load {transcript}", "/stats", ""])
    code, conv, said, _ = run_repl(engine, script)
    assert code == 0
    full, cleared, loaded = context_in_use(said)
    # Cleared: what the next prompt holds before the message, though the engine's cache
    # still has the old turns in it.
    empty = chat.Conversation.for_engine(engine)
    assert cleared == len(engine.tokenize(empty.render(""))) < full
    assert engine.cached_tokens > cleared
    assert loaded == full == len(engine.tokenize(conv.render("")))
    assert any(re.search(r"context .* · 0 turns", line) for line in said)


def test_repl_reports_bad_commands_and_goes_on(engines):
    engine = engines("qwen3-coder")
    code, conv, said, _ = run_repl(engine, "/think\n/frobnicate\n/set temp hot\n/budget lots\nhi\n")
    assert code == 0  # the end of input leaves like Ctrl-D
    text = "\n".join(said)
    assert "no thinking mode" in text
    assert "unknown command /frobnicate" in text
    assert "temp needs a number" in text
    assert "/budget needs a number" in text
    assert [t.user for t in conv.turns] == ["hi"]


def test_repl_triple_quoted_block_is_one_message(engines):
    engine = engines("qwen3")
    code, conv, _, _ = run_repl(engine, '"""first line\n\nsecond line\n"""\n/bye\n')
    assert code == 0
    assert [t.user for t in conv.turns] == ["first line\n\nsecond line"]


def test_repl_help_lists_every_command(engines):
    _, _, said, _ = run_repl(engines("qwen3"), "/help\n")
    text = "\n".join(said)
    for command in repl.COMMANDS:
        assert command.name in text
    assert "Alt+Enter" in text


class FailAfter(render.PlainRenderer):
    """Stands in for an error mid-answer (a decode failure surfaces the same way)."""

    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.left = n

    def answer(self, text: str) -> None:
        super().answer(text)
        self.left -= 1
        if self.left == 0:
            raise RuntimeError("boom")


def test_a_turn_that_fails_midway_leaves_the_output_tidy(engines):
    engine = engines("qwen3", n_ctx=512)
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 1, "max_tokens": 40}
    )
    stdout = io.StringIO()
    out = FailAfter(3, out=stdout, err=io.StringIO())
    with pytest.raises(RuntimeError, match="boom"):
        chat.run_turn(engine, conv, out, "hello")
    assert stdout.getvalue().endswith("\n")  # the error will start on a line of its own
    assert conv.turns == []
