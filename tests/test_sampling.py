"""The one table of sampling settings (`qwenrun.sampling`) and every consumer that reads it.

For each setting of the table: the command line refuses a value beyond its range with one
line and exit code 2 (a real `qwenrun run`), `/set` (or `/budget`) refuses it in a real
`qwenrun chat`, a transcript holding it is refused whole, and the server answers 400 naming
the request field (the real app, on loopback, in front of a tiny model). And the other way
round: the command line's options, the `/set` names and the server's fields are exactly the
table's, so a setting added to the table reaches them all.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main

from qwenrun import catalog, chat, cli, errors, sampling
from qwenrun.engine.values import SamplingParams
from qwenrun.sampling import SETTINGS, Setting, format_number
from qwenrun.serve import client as remote_client
from qwenrun.serve import protocol
from qwenrun.serve.runner import ServedModel
from qwenrun.synthetic.tiny_gguf import template_text
from qwenrun.template import ChatTemplate, ModelProfile, model_profile
from qwenrun.testing.proc import error_line, run_qwenrun
from qwenrun.testing.served import serving
from qwenrun.transcript import read_transcript
from qwenrun.ui import prompt, repl

USER = [{"role": "user", "content": "hi"}]


def _step(s: Setting) -> int | float:
    return 1 if s.kind is int else 0.5


def beyond(s: Setting) -> list[int | float]:
    """A value just below the range and one just above it."""
    return [s.lo - _step(s), s.hi + _step(s)]


def above(s: Setting) -> int | float:
    return s.hi + _step(s)


def range_message(s: Setting, name: str) -> str:
    return f"{name} must be between {format_number(s.lo)} and {format_number(s.hi)}"


ids = [s.key for s in SETTINGS]
SET_SETTINGS = [s for s in SETTINGS if s.command == "/set"]


# ---- the table itself


def test_the_table_names_each_setting_once_and_its_defaults_are_the_engines():
    for column in ("key", "field", "flag"):
        values = [getattr(s, column) for s in SETTINGS]
        assert len(values) == len(set(values)), column
    fields = [name for s in SETTINGS for name in s.server]
    assert len(fields) == len(set(fields))
    engine_defaults = SamplingParams()
    for s in SETTINGS:
        assert s.lo < s.hi
        assert s.default is None or s.lo <= s.default <= s.hi
        assert s.command in ("/set", f"/{s.key}")
        if s.sampler:
            # The engine's dataclass holds every sampler setting, with the table's default.
            assert getattr(engine_defaults, s.field) == s.default, s.key
    assert {f.name for f in dataclasses.fields(SamplingParams)} - {"ban_eog"} == {
        s.field for s in SETTINGS if s.sampler
    }


@pytest.mark.parametrize("s", SETTINGS, ids=ids)
def test_check_and_parse_take_both_ends_and_refuse_beyond_them(s: Setting):
    assert s.check(s.lo) == s.lo and s.check(s.hi) == s.hi
    assert s.parse(str(s.hi)) == s.hi
    for value in beyond(s):
        with pytest.raises(errors.UsageError) as caught:
            s.check(value, "--x")
        assert caught.value.message.startswith(range_message(s, "--x"))
        with pytest.raises(errors.UsageError, match="must be between"):
            s.parse(str(value))
    for wrong in ("1", True, None, [1]):
        with pytest.raises(errors.UsageError, match="needs a"):
            s.check(wrong)
    with pytest.raises(errors.UsageError, match="needs a"):
        s.parse("lots")
    if s.kind is int:
        assert s.check(float(s.lo)) == s.lo and isinstance(s.check(float(s.lo)), int)
        with pytest.raises(errors.UsageError, match="whole number"):
            s.check(s.lo + 0.5)


def test_a_huge_number_is_out_of_range_not_an_overflow():
    with pytest.raises(errors.UsageError, match="temp must be between"):
        sampling.BY_KEY["temp"].check(10**400)


# ---- every consumer's names are the table's


def _options(command: str) -> dict[str, Any]:
    group = typer.main.get_command(cli.app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {p.name: p for p in params}


@pytest.mark.parametrize("command", ["run", "chat"])
def test_the_command_line_options_are_the_tables(command: str):
    options = _options(command)
    for s in SETTINGS:
        option = options[s.attr]
        assert option.opts == [s.flag]
        assert option.help == s.help
        assert option.default is None  # not given: the preset (or no limit) applies
    chat_flags = {f.name for f in dataclasses.fields(cli.ChatFlags)}
    assert chat_flags == {"think", "show_thinking", "system", "effort"} | {s.attr for s in SETTINGS}


def test_the_command_line_hands_each_setting_to_the_conversation_by_field():
    given = {s.attr: s.hi for s in SETTINGS}
    flags = cli.ChatFlags(think=None, show_thinking=False, system=None, effort=None, **given)
    kwargs = flags.conversation()
    assert kwargs["settings"] == {s.field: s.hi for s in SET_SETTINGS}
    assert kwargs["budget"] == sampling.BY_KEY["budget"].hi
    conv = chat.Conversation(ChatTemplate(template_text("qwen3")), _profile(), **kwargs)
    params = conv.sampling()
    for s in SETTINGS:
        where = params if s.sampler else conv
        assert getattr(where, s.field) == s.hi, s.key


def test_the_set_names_and_completions_are_the_tables():
    keys = [s.key for s in SET_SETTINGS]
    assert list(prompt.SET_KEYS) == keys
    set_help = next(c for c in repl.COMMANDS if c.name == "/set").help
    assert set_help == ", ".join(keys)
    commands = {c.name for c in repl.COMMANDS}
    assert {s.command for s in SETTINGS} <= commands
    with pytest.raises(errors.UsageError, match="unknown setting 'budget'"):
        _conversation().set("budget", 5)  # it has a command of its own: /budget


def _profile(presets: dict[str, SamplingParams] | None = None) -> ModelProfile:
    profile = model_profile(ChatTemplate(template_text("qwen3")), "m")
    return dataclasses.replace(profile, presets=presets or profile.presets)


def _conversation() -> chat.Conversation:
    return chat.Conversation(ChatTemplate(template_text("qwen3")), _profile())


@pytest.mark.parametrize("s", SETTINGS, ids=ids)
def test_the_server_reads_each_setting_from_each_of_its_fields(s: Setting):
    for name in s.server:
        req = protocol.parse_chat({"messages": USER, name: s.hi})
        if s.sampler:
            assert req.sampling == {s.field: s.hi}
        else:
            assert getattr(req, s.field) == s.hi
        if s.key != "budget":  # a raw completion has no thinking
            text = protocol.parse_completion({"prompt": "x", name: s.lo})
            assert (text.sampling if s.sampler else {s.field: text.max_tokens}) == {s.field: s.lo}


def test_the_server_takes_no_sampling_field_the_table_lacks():
    # llama-server's other sampler fields are ignored, as any unknown field is.
    others = {"typical_p": 0.5, "mirostat": 2, "repeat_last_n": 8, "dry_multiplier": 0.8}
    req = protocol.parse_chat({"messages": USER, **others})
    assert req.sampling == {} and req.max_tokens is None and req.budget is None


def test_a_request_giving_two_names_of_one_setting_takes_the_first_listed():
    first, second = sampling.BY_KEY["max-tokens"].server
    req = protocol.parse_chat({"messages": USER, first: 5, second: 9})
    assert req.max_tokens == 5


def test_catalog_presets_carry_every_setting_they_give():
    spec = catalog.lookup("qwen3-coder-30b-a3b-instruct")
    profile = model_profile(ChatTemplate(template_text("qwen3")), "coder", spec)
    assert profile.presets["direct"].repeat_penalty == 1.05  # the Coder card's


def test_the_readme_lists_each_setting_with_its_range():
    readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| ")]
    for s in SETTINGS:
        row = next((r for r in rows if f"| `{s.flag}` |" in r), None)
        assert row is not None, s.flag
        assert f"| {s.range_text()} |" in row, s.key
        assert all(f"`{name}`" in row for name in s.server), s.key


# ---- transcripts


def _transcript(tmp_path: Path, extra: dict[str, Any]) -> Path:
    doc = {
        "format": "qwenrun-transcript/1",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        **extra,
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc), "utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("s", SETTINGS, ids=ids)
def test_a_transcript_holding_a_setting_beyond_its_range_is_refused_whole(tmp_path, s: Setting):
    for value in beyond(s):
        extra = {"settings": {s.field: value}} if s.command == "/set" else {s.field: value}
        path = _transcript(tmp_path, extra)
        conv = _conversation()
        conv.system = "kept"
        with pytest.raises(errors.UsageError) as caught:
            conv.load(path)
        assert str(path) in caught.value.message and s.key in caught.value.message
        assert format_number(s.hi) in caught.value.message  # the range is named
        assert conv.system == "kept" and conv.turns == []
    inside = {"settings": {s.field: s.hi}} if s.command == "/set" else {s.field: s.hi}
    loaded = read_transcript(_transcript(tmp_path, inside))
    value = loaded.settings.get(s.field) if s.sampler else getattr(loaded, s.field)
    assert value == s.hi


# ---- the command line, as a process


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models("qwen3moe", steer=2)


@pytest.mark.slow
@pytest.mark.parametrize("s", SETTINGS, ids=ids)
def test_the_command_line_refuses_each_setting_beyond_its_range(model, s: Setting):
    proc = run_qwenrun("run", str(model), "hello", s.flag, str(above(s)))
    line = error_line(proc, 2)
    assert line.startswith(f"error: {range_message(s, s.flag)}")
    assert proc.stdout == ""


@pytest.mark.slow
def test_set_and_budget_refuse_each_setting_beyond_its_range_and_stats_shows_the_table(model):
    script = []
    for s in SETTINGS:
        for value in beyond(s):
            key = f" {s.key}" if s.command == "/set" else ""
            script.append(f"{s.command}{key} {value}")
    script += ["/set repeat-penalty 1.25", "/set seed 7", "/stats"]
    proc = run_qwenrun("chat", str(model), stdin="\n".join(script) + "\n")
    assert proc.returncode == 0, proc.stderr  # each refusal leaves the chat going
    for s in SETTINGS:
        name = s.key if s.command == "/set" else s.command
        assert proc.stderr.count(range_message(s, name)) == 2, s.key
    assert "Traceback" not in proc.stderr
    assert "repeat-penalty 1.25 · seed 7" in proc.stderr  # /stats reads the table too


# ---- the server: the real app on loopback, in front of a tiny model

# The Coder card's preset: settings whose values differ from the engine's defaults.
CODER_LIKE = SamplingParams(
    temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5, repeat_penalty=1.05
)


@pytest.fixture(scope="module")
def server(model) -> Iterator[tuple[str, ServedModel]]:
    with serving(model, ctx=512) as running:
        running.served.profile = _profile({"think": CODER_LIKE, "direct": CODER_LIKE})
        yield running.url, running.served


@pytest.mark.slow
@pytest.mark.parametrize("s", SETTINGS, ids=ids)
def test_the_server_refuses_each_setting_beyond_its_range_naming_the_field(server, s: Setting):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as http:
        for name in s.server:
            for value in beyond(s):
                resp = http.post("/v1/chat/completions", json={"messages": USER, name: value})
                assert resp.status_code == 400, resp.text
                err = resp.json()["error"]
                assert err["param"] == name
                assert err["message"].startswith(range_message(s, name))


@pytest.mark.slow
def test_temperature_3_gets_the_same_verdict_from_the_command_line_and_the_server(model, server):
    proc = run_qwenrun(
        "run", str(model), "hello", "--temp", "3", "--max-tokens", "2", "--ctx", "512"
    )
    assert proc.returncode == 0, proc.stderr
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as http:
        body = {"messages": USER, "temperature": 3, "max_tokens": 2}
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text


@pytest.mark.slow
def test_the_penalties_reach_llama_cpps_sampler(model):
    # llama.cpp's penalties sampler of this build takes the vocabulary size first; a call
    # without it failed on every model whose preset has a presence penalty (Qwen3's cards).
    args = ("--presence-penalty", "1.5", "--repeat-penalty", "1.1", "--max-tokens", "4")
    proc = run_qwenrun("run", str(model), "hello", *args, "--ctx", "512", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_a_remote_model_reads_the_servers_presets_with_every_setting(server):
    url, served = server
    remote = remote_client.RemoteModel.connect(url)
    assert remote.profile().presets == served.profile.presets


RECORDED: list[dict[str, Any]] = []


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for a server: keeps the body of each POST, answers 400."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        RECORDED.append(json.loads(self.rfile.read(length)))
        payload = json.dumps(protocol.error_body("recorded", "invalid_request_error")).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_chat_server_sends_every_setting_under_the_tables_field(server):
    url, _ = server
    card = remote_client.list_models(url)[0]  # the real server's model, its presets
    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    try:
        where = remote_client.Endpoint.parse(f"127.0.0.1:{recorder.server_port}")
        remote = remote_client.RemoteModel(where, card, None)
        settings = {s.field: s.hi for s in SET_SETTINGS}
        conv = remote.conversation(settings=settings, budget=sampling.BY_KEY["budget"].hi)
        with pytest.raises(errors.QwenrunError):
            list(remote.stream_turn(conv, "hello"))
    finally:
        recorder.shutdown()
    body = RECORDED[-1]
    for s in SETTINGS:
        assert body[s.server[0]] == s.hi, s.key
    # And what it sends, the server reads back as the same settings.
    req = protocol.parse_chat(body)
    assert req.sampling == {s.field: s.hi for s in SETTINGS if s.sampler}
    assert (req.max_tokens, req.budget) == (
        sampling.BY_KEY["max-tokens"].hi,
        sampling.BY_KEY["budget"].hi,
    )


def test_of_two_names_for_one_limit_the_newer_wins_in_a_request():
    # OpenAI's max_completion_tokens replaces max_tokens; llama.cpp's reasoning_budget is read
    # after Qwen's thinking_budget, as the server read them before the table.
    from qwenrun.serve import protocol

    req = protocol.parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "max_completion_tokens": 5,
            "thinking_budget": 7,
            "reasoning_budget": 9,
        }
    )
    assert (req.max_tokens, req.budget) == (5, 9)
