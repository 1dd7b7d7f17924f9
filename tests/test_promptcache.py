"""The prompt cache on disk: a later engine or process loads an evaluated prefix instead of
evaluating it; damaged or foreign files are ignored and removed; the cap evicts the oldest.

Every test has its own QWENRUN_HOME (conftest), so the cache folder starts empty.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from pathlib import Path

import pytest

from qwenrun import chat, config, errors
from qwenrun.engine import promptcache
from qwenrun.engine.llama import Engine
from qwenrun.engine.loadconfig import LoadConfig
from qwenrun.engine.values import GenStats, SamplingParams
from qwenrun.synthetic.tiny_gguf import ARCHES, HYBRID_ARCHES
from qwenrun.testing.proc import error_line, run_qwenrun

# About 1,300 tokens in the tiny vocabulary (a byte or so per token): over MIN_TOKENS.
_rng = random.Random(7)
DOC = " ".join("".join(_rng.choice("abcdefghijklmnop") for _ in range(5)) for _ in range(220))
# The template's frame after a question: `<|im_end|>\n<|im_start|>assistant\n` and, in direct
# mode, `<think>\n\n</think>\n\n`: 19 tokens in the tiny vocabulary (which spells `assistant`
# byte by byte; Qwen's takes 9), with a little room.
FRAME = 24
# A hybrid also evaluates the document's end back to the checkpoint before the question (the
# smallest tail offset): its recurrent state cannot be cut anywhere else.
HYBRID_SLACK = 32


def cache_files() -> list[Path]:
    return sorted(promptcache.folder().glob(f"*{promptcache.SUFFIX}"))


def load(path: Path, cache: int | None = None) -> Engine:
    return Engine.load(path, LoadConfig(n_ctx=2048, prompt_cache=cache))


def prompt_for(engine: Engine, question: str) -> list[int]:
    conv = chat.Conversation.for_engine(engine, mode="direct")
    return engine.tokenize(conv.render(f"{DOC}\n\n{question}"))


def greedy(engine: Engine, prompt: list[int]) -> tuple[str, GenStats]:
    gen = engine.generate(prompt, SamplingParams(temperature=0), 8)
    text = gen.text()
    assert gen.stats is not None
    return text, gen.stats


def fresh_answer(path: Path, prompt: list[int]) -> str:
    engine = load(path, cache=0)
    try:
        return greedy(engine, prompt)[0]
    finally:
        engine.close()


def first_run(path: Path, question: str = "What is it about?") -> tuple[list[int], GenStats]:
    """Evaluate the document once and leave its entry on disk."""
    engine = load(path)
    try:
        prompt = prompt_for(engine, question)
        _, stats = greedy(engine, prompt)
    finally:
        engine.close()  # waits for the background write
    assert stats.reused_tokens == 0 and stats.eval_prompt_tokens == len(prompt)
    return prompt, stats


@pytest.fixture(scope="module")
def models(tiny_models):
    return {a: tiny_models(a, steer=2) for a in ARCHES}


# ---- a later engine, the same prefix


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_a_later_engine_loads_the_document_and_evaluates_only_the_question(models, arch):
    path = models[arch]
    first, _ = first_run(path)
    assert len(cache_files()) == 1
    engine = load(path)
    try:
        prompt = prompt_for(engine, "Who wrote it?")
        text, stats = greedy(engine, prompt)
        report = engine.cache_report().disk
    finally:
        engine.close()
    shared = next(i for i, (a, b) in enumerate(zip(first, prompt, strict=False)) if a != b)
    assert stats.reused_from == "disk"
    assert stats.reused_tokens + stats.eval_prompt_tokens == len(prompt)
    if arch in HYBRID_ARCHES:
        # From the last checkpoint before the question (the recurrent state cannot be cut).
        assert len(prompt) - shared < stats.eval_prompt_tokens <= len(prompt) - shared + 32
    else:
        assert stats.eval_prompt_tokens == len(prompt) - shared  # the question, exactly
    assert text == fresh_answer(path, prompt)
    assert report is not None and report.loaded_tokens == stats.reused_tokens
    # Only a little was new: nothing more is written, the one entry stays.
    assert report.saved == 0 and len(cache_files()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_the_same_prompt_again_evaluates_almost_nothing(models, arch):
    prompt, _ = first_run(models[arch])
    engine = load(models[arch])
    try:
        text, stats = greedy(engine, prompt)
    finally:
        engine.close()
    # A hybrid restarts after `assistant\n`: the empty think block of direct mode (6 tokens
    # in the tiny vocabulary, 4 in Qwen's) is evaluated again.
    assert stats.reused_from == "disk"
    assert stats.eval_prompt_tokens == (6 if arch in HYBRID_ARCHES else 1)
    assert text == fresh_answer(models[arch], prompt)


@pytest.mark.slow
def test_a_cache_of_zero_writes_nothing(models):
    engine = load(models["qwen3moe"], cache=0)
    try:
        greedy(engine, prompt_for(engine, "Q?"))
        assert engine.cache_report().disk is None
    finally:
        engine.close()
    assert not promptcache.folder().exists()


@pytest.mark.slow
def test_the_environment_variable_sets_the_cap(models, monkeypatch):
    monkeypatch.setenv(promptcache.ENV, "off")
    engine = load(models["qwen3moe"])
    try:
        assert engine.cache_report().disk is None
    finally:
        engine.close()
    monkeypatch.setenv(promptcache.ENV, "lots")
    with pytest.raises(errors.UsageError, match="QWENRUN_PROMPT_CACHE"):
        load(models["qwen3moe"])


# ---- damaged and foreign files


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "flipped byte":
        i = len(data) - 500  # inside the state: only the checksum can tell
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header only":
        (n,) = struct.unpack("<I", data[8:12])
        path.write_bytes(data[: 12 + n])


def rekey(source: Path, key: dict, dest: Path) -> None:
    """`source`'s states under another key, checksums intact: a file that passes every
    check of ours and that llama.cpp must judge."""
    data = source.read_bytes()
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    header["key"] = key
    head = json.dumps(header, sort_keys=True).encode()
    dest.write_bytes(data[:8] + struct.pack("<I", len(head)) + head + data[12 + n :])


def assert_survived(path: Path, prompt: list[int]) -> None:
    """A full evaluation, the same answer, the bad file removed and replaced by a good one."""
    engine = load(path)
    try:
        text, stats = greedy(engine, prompt)
    finally:
        engine.close()  # waits for the new entry to be written
    report = engine.cache_report().disk
    assert stats.reused_tokens == 0 and stats.eval_prompt_tokens == len(prompt)
    assert text == fresh_answer(path, prompt)
    assert report is not None and report.removed_bad == 1 and report.saved == 1
    # The one file now is the new, good entry: the next engine loads it.
    assert len(cache_files()) == 1
    engine = load(path)
    try:
        assert greedy(engine, prompt)[1].reused_from == "disk"
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "flipped byte", "garbage", "empty", "header only"])
def test_a_damaged_entry_is_ignored_and_removed(models, how):
    path = models["qwen35moe"]
    prompt, _ = first_run(path)
    (entry,) = cache_files()
    damage(entry, how)
    assert_survived(path, prompt)


@pytest.mark.slow
def test_an_entry_of_other_weights_with_the_same_shapes_is_foreign(tiny_models, models):
    # llama.cpp itself would load this state without a word, and answer differently.
    path = models["qwen35moe"]
    other = tiny_models("qwen35moe", steer=2, seed=1, name="tiny-qwen35moe-other-weights")
    prompt, _ = first_run(path)
    (ours,) = cache_files()
    ours.unlink()
    first_run(other)
    (theirs,) = cache_files()
    theirs.rename(ours)  # exactly where this model's entry for this prompt would be
    assert_survived(path, prompt)


@pytest.mark.slow
def test_a_state_llama_cpp_refuses_is_removed_and_the_context_cleared(models):
    # Our checks pass (key and checksums rewritten), but the state is another arch's.
    path = models["qwen35moe"]
    prompt, _ = first_run(path)
    (ours,) = cache_files()
    key = json.loads(ours.read_bytes()[12 : 12 + struct.unpack("<I", ours.read_bytes()[8:12])[0]])
    ours.unlink()
    first_run(models["qwen3next"], "What is it about?")
    (theirs,) = cache_files()
    rekey(theirs, key["key"], ours)
    theirs.unlink()
    assert_survived(path, prompt)


# ---- the folder: cap, LRU, atomic writes


def snapshot(seed: int, n_tokens: int = 300, size: int = 20_000) -> promptcache.Snapshot:
    rng = random.Random(seed)
    tokens = [rng.randrange(1000) for _ in range(n_tokens)]
    return promptcache.Snapshot(tokens, bytearray(rng.randbytes(size)), [(100, bytearray(500))])


def write(cache: promptcache.PromptCache, snap: promptcache.Snapshot) -> Path:
    before = set(cache_files())
    cache.save_async(snap)
    cache.wait()
    (new,) = set(cache_files()) - before
    return new


def test_the_cap_evicts_the_least_recently_used_entry():
    key = {"model": "m", "build": "b"}
    cache = promptcache.PromptCache(promptcache.folder(), 50_000, key)  # two entries fit
    a = write(cache, snapshot(1))
    os.utime(a, (time.time() - 30, time.time() - 30))
    b = write(cache, snapshot(2))
    os.utime(b, (time.time() - 20, time.time() - 20))
    # Using `a` makes `b` the oldest.
    (entry,) = cache.candidates(snapshot(1).tokens)
    cache.used(entry, 10)
    c = write(cache, snapshot(3))
    assert {p.name for p in cache_files()} == {a.name, c.name}
    assert cache.report().entries == 2 and cache.report().bytes <= cache.cap


def test_an_entry_reads_back_checked_and_leaves_no_temporary_file():
    cache = promptcache.PromptCache(promptcache.folder(), promptcache.DEFAULT_CAP, {"k": 1})
    snap = snapshot(4)
    path = write(cache, snap)
    (entry,) = cache.candidates(snap.tokens)
    assert entry.tokens == snap.tokens and entry.path == path
    assert cache.read(entry, entry.full) == snap.full
    assert [p.n_tokens for p in entry.partials] == [100]
    assert list(promptcache.folder().glob("*.tmp")) == []
    # Another key does not see it; a prompt that begins otherwise does not either.
    other = promptcache.PromptCache(promptcache.folder(), promptcache.DEFAULT_CAP, {"k": 2})
    assert other.candidates(snap.tokens) == [] and path.exists()
    assert cache.candidates([7, *snap.tokens]) == []


def test_a_writer_killed_midway_leaves_nothing_that_is_read():
    cache = promptcache.PromptCache(promptcache.folder(), promptcache.DEFAULT_CAP, {"k": 1})
    promptcache.folder().mkdir(parents=True)
    stale = promptcache.folder() / ".x.qwrc.123.456.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    write(cache, snapshot(5))
    assert not stale.exists()


def test_an_entry_bigger_than_half_the_cap_is_not_written():
    cache = promptcache.PromptCache(promptcache.folder(), 15_000, {"k": 1})
    cache.save_async(snapshot(6))
    cache.wait()
    assert cache_files() == []


@pytest.mark.parametrize(
    ("text", "cap"),
    [("0", 0), ("off", 0), ("512M", 512 << 20), ("2GiB", 2 << 30), ("3", 3 << 30), ("on", 4 << 30)],
)
def test_cap_values(text, cap):
    assert promptcache.parse_cap(text, "--prompt-cache") == cap


def test_a_bad_cap_names_its_source():
    with pytest.raises(errors.UsageError, match="--prompt-cache"):
        promptcache.parse_cap("big", "--prompt-cache")


def test_the_cache_lives_under_the_qwenrun_home():
    assert promptcache.folder() == config.qwenrun_home() / "prompt-cache"


# ---- `qwenrun run`, twice, as a user would


def run_json(model: Path, question: str, *extra: str, env: dict[str, str] | None = None):
    # `cat report.txt | qwenrun run MODEL "question"`: the piped document comes first.
    proc = run_qwenrun(
        "run",
        str(model),
        question,
        "--json",
        "--no-think",
        "--max-tokens",
        "4",
        "--seed",
        "1",
        "--ctx",
        "2048",
        *extra,
        stdin=f"{DOC}\n",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["stats"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_a_second_run_with_the_same_piped_document_evaluates_only_the_question(models, arch):
    first = run_json(models[arch], "What is it about?")
    second = run_json(models[arch], "Who wrote it?")
    assert first["reused_tokens"] == 0 and first["eval_prompt_tokens"] == first["prompt_tokens"]
    assert second["reused_from"] == "disk"
    # The question and the template's frame after it (a hybrid: from the checkpoint before).
    slack = FRAME + (HYBRID_SLACK if arch in HYBRID_ARCHES else 0)
    assert second["eval_prompt_tokens"] <= len("Who wrote it?") + slack
    assert second["reused_tokens"] + second["eval_prompt_tokens"] == second["prompt_tokens"]
    assert len(cache_files()) == 1
    assert list(promptcache.folder().glob("*.tmp")) == []


@pytest.mark.slow
def test_a_link_out_of_the_folder_or_a_fifo_is_passed_over_unopened(models, tmp_path):
    model = models["qwen3moe"]
    run_json(model, "What is it about?")
    (entry,) = cache_files()
    # The entry moved out of the folder, a link to it left in its place: not followed.
    outside = tmp_path / "elsewhere.qwrc"
    entry.rename(outside)
    entry.symlink_to(outside)
    linked = run_json(model, "Who wrote it?")
    assert linked["reused_tokens"] == 0
    assert outside.read_bytes()[:8] == promptcache.MAGIC  # left whole
    # A FIFO under the first entry's very name, alone in the folder: its open would wait
    # for a writer, forever.
    for path in cache_files():
        path.unlink()
    os.mkfifo(entry)
    proc = run_qwenrun(
        "run", str(model), "What is it about?", "--json", "--no-think", "--max-tokens", "4",
        "--seed", "1", "--ctx", "2048", stdin=f"{DOC}\n", timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["reused_tokens"] == 0


@pytest.mark.slow
def test_run_with_the_cache_off_writes_nothing(models):
    stats = run_json(models["qwen3moe"], "Q?", "--prompt-cache", "0")
    assert stats["reused_tokens"] == 0
    assert not promptcache.folder().exists()


@pytest.mark.slow
def test_a_bad_prompt_cache_value_is_a_one_line_error(models):
    proc = run_qwenrun("run", str(models["qwen3moe"]), "hi", "--prompt-cache", "huge")
    assert "--prompt-cache" in error_line(proc, 2)
    proc = run_qwenrun("run", str(models["qwen3moe"]), "hi", env={promptcache.ENV: "huge"})
    assert promptcache.ENV in error_line(proc, 2)
