"""Conversations: Qwen's real templates, modes, transcripts, and turns on the real engine."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from qwenrun import chat, errors
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.template import ChatTemplate, model_profile
from qwenrun.testing.tiny_gguf import template_text
from qwenrun.thinking import BARE_CLOSE, WRAP_UP
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
    conv.add_turn(
        chat.Turn("first?", "the visible answer", thinking="SECRET-THOUGHT", mode="think")
    )
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
        ("top-p", "1.5", "between"),
        ("max-tokens", "0", "between"),
        ("colour", "blue", "unknown setting"),
    ],
)
def test_bad_settings_are_usage_errors(key, value, message):
    with pytest.raises(errors.UsageError, match=message):
        conversation("qwen3").set(key, value)


# ---- transcripts


def test_transcript_round_trip(tmp_path: Path):
    conv = conversation("qwen3", system="Sys", budget=50, settings={"temp": 0.4})
    conv.add_turn(chat.Turn("q1", "a1", thinking="t1", mode="think"))
    conv.set_mode("direct")
    conv.add_turn(chat.Turn("q2 é", "a2 cut", mode="direct", cut=True))
    path = tmp_path / "sub" / "chat.json"
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
    conv.add_turn(chat.Turn("q", "a", mode="think"))
    conv.save(tmp_path / "t.json")
    coder = conversation("qwen3-coder")
    notes = coder.load(tmp_path / "t.json")
    assert coder.mode == "direct" and len(coder.turns) == 1
    assert any("no think mode" in n for n in notes)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a JSON transcript"),
        ('{"x": 1}', "no messages"),
        (
            '{"messages": [{"role": "assistant", "content": "a"},'
            ' {"role": "user", "content": "q"}]}',
            "followed by an answer",
        ),
    ],
)
def test_bad_transcripts_are_usage_errors(tmp_path: Path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(errors.UsageError, match=message):
        conversation("qwen3").load(path)
    with pytest.raises(errors.UsageError, match="no such transcript"):
        conversation("qwen3").load(tmp_path / "missing.json")


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


def test_thinking_never_eats_the_whole_token_cap(engines):
    engine = engines("qwen3.5")
    conv = chat.Conversation.for_engine(engine, settings={"seed": 2, "max_tokens": 40})
    result = chat.run_turn(engine, conv, quiet(), "q")
    assert result.thinking and result.answer.strip(), (result.thinking, result.answer)
    # Closed at 30 of 40 tokens (a quarter kept back), plus the tokens of the close itself.
    assert 30 <= result.thinking_tokens <= 30 + len(engine.tokenize(BARE_CLOSE))


def test_direct_mode_on_a_hybrid_has_no_thinking(engines):
    engine = engines("qwen3.5")
    conv = chat.Conversation.for_engine(
        engine, mode="direct", settings={"seed": 2, "max_tokens": 10}
    )
    result = chat.run_turn(engine, conv, quiet(), "q")
    assert result.thinking == "" and result.answer and result.thinking_tokens == 0


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
