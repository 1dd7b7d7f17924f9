"""Renderers and prompt helpers, fed by hand (the engine-driven paths are in test_chat)."""

from __future__ import annotations

import io
import json
import re

import pytest
from prompt_toolkit.document import Document
from rich.console import Console

from qwenrun import chat
from qwenrun.engine.values import GenStats, SamplingParams
from qwenrun.ui import render, repl
from qwenrun.ui.prompt import ChatPrompt, _command_completer, strip_triple_quotes, triple_quote_open

STATS = GenStats(
    prompt_tokens=40,
    eval_prompt_tokens=30,
    generated_tokens=128,
    ttft_ms=210.0,
    prefill_tok_s=812.4,
    decode_tok_s=41.26,
    decode_wall_ms=3100.0,
    llama_eval_ms=3000.0,
    llama_sample_ms=12.0,
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def result(**kw: object) -> chat.TurnResult:
    base: dict[str, object] = dict(
        answer="Hi.", thinking="hmm", finish_reason="stop", stats=STATS, mode="think"
    )
    base.update(kw)
    return chat.TurnResult(**base)  # type: ignore[arg-type]


def feed(renderer: chat.Renderer, thinking: str = "hmm", answer: str = "Hi.") -> None:
    renderer.thinking(thinking)
    renderer.thinking_done(4.23, 312)
    renderer.answer(answer)
    renderer.turn_done(result(answer=answer, thinking=thinking))


def test_stats_line():
    assert (
        render.format_stats(STATS)
        == "TTFT 0.21 s · prefill 812 tok/s · decode 41.3 tok/s · 128 tokens"
    )
    assert render.format_thought(4.23, 312) == "Thought for 4.2 s · 312 tokens"


def test_stats_write_sampling_numbers_as_people_do():
    text = repl._describe_sampling(
        SamplingParams(temperature=1e-05, top_p=1.0, top_k=1_000_000, seed=2**32 - 1)
    )
    assert text == ("temp 0.00001 · top-p 1.0 · top-k 1,000,000 · min-p 0.0 · seed 4,294,967,295")


def test_plain_renderer_keeps_stdout_for_the_answer():
    out, err = io.StringIO(), io.StringIO()
    feed(render.PlainRenderer(out=out, err=err))
    assert out.getvalue() == "Hi.\n"
    assert err.getvalue() == ""


def test_plain_renderer_shows_thinking_and_stats_on_stderr_when_asked():
    out, err = io.StringIO(), io.StringIO()
    feed(render.PlainRenderer(out=out, err=err, show_thinking=True, show_stats=True))
    assert out.getvalue() == "Hi.\n"
    assert err.getvalue() == "hmm\n" + render.format_stats(STATS) + "\n"
    assert not ANSI.search(err.getvalue())


def test_json_renderer_prints_one_object_with_extra_fields():
    out = io.StringIO()
    renderer = render.JsonRenderer(out=out, extra={"placement": {"n_gpu_layers": 0}})
    renderer.notice("Context full: dropped the oldest turn of the conversation.")
    feed(renderer)
    doc = json.loads(out.getvalue())
    assert doc["answer"] == "Hi." and doc["thinking"] == "hmm"
    assert doc["stats"]["generated_tokens"] == 128
    assert doc["placement"] == {"n_gpu_layers": 0}
    assert doc["notices"] == ["Context full: dropped the oldest turn of the conversation."]


def tty() -> tuple[render.TTYRenderer, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=err, force_terminal=True, width=80, height=24, color_system="standard")
    return render.TTYRenderer(out=out, err=console), out, err


def test_tty_renderer_folds_thinking_and_ends_with_stats():
    renderer, out, err = tty()
    feed(renderer, thinking="weighing options", answer="Hi.")
    assert out.getvalue() == "Hi.\n"
    text = ANSI.sub("", err.getvalue())
    assert "Thought for 4.2 s · 312 tokens" in text
    assert text.rstrip().endswith(render.format_stats(STATS))
    assert "\x1b[2m" in err.getvalue()  # dim: thinking and stats are chrome


def test_tty_renderer_shows_thinking_when_asked():
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=err, force_terminal=True, width=80, color_system="standard")
    feed(render.TTYRenderer(out=out, err=console, show_thinking=True), thinking="step one")
    text = ANSI.sub("", err.getvalue())
    assert text.index("Thinking") < text.index("step one") < text.index("Thought for")


def test_tty_renderer_marks_a_cut_answer():
    renderer, _, err = tty()
    renderer.answer("partial")
    renderer.turn_done(result(answer="partial", finish_reason="cancelled"))
    assert "[stopped]" in ANSI.sub("", err.getvalue())


def test_tty_renderer_drops_control_characters_from_model_text():
    renderer, out, _ = tty()
    renderer.answer("a\x1b[2Jb\x07c\td\ne\r")
    assert out.getvalue() == "a[2Jbc\td\ne"  # ESC, BEL and CR gone: no escape can act


@pytest.mark.parametrize(
    ("text", "is_open"),
    [('"""', True), ('"""abc', True), ('"""abc\ndef"""', False), ('"""x"""', False), ("hi", False)],
)
def test_triple_quote_blocks(text, is_open):
    assert triple_quote_open(text) is is_open


def test_strip_triple_quotes():
    assert strip_triple_quotes('"""\nline 1\nline 2\n"""') == "line 1\nline 2"
    assert strip_triple_quotes('"""one"""') == "one"


def completions(text: str) -> list[str]:
    completer = _command_completer(repl.COMMANDS)
    return [c.text for c in completer.get_completions(Document(text), None)]


def test_completion_of_commands_and_their_arguments():
    assert completions("/th") == ["/think"]
    assert set(completions("/")) == {c.name for c in repl.COMMANDS}
    assert completions("/set to") == ["top-p", "top-k"]
    assert completions("/budget o") == ["off"]
    assert completions("hello /th") == []


def test_plain_prompt_reads_lines_and_blocks():
    prompt = ChatPrompt(
        repl.COMMANDS, None, interactive=False, stdin=io.StringIO('hi\n"""a\nb"""\nlast')
    )
    assert [prompt.read(), prompt.read(), prompt.read()] == ["hi", "a\nb", "last"]
    with pytest.raises(EOFError):
        prompt.read()
