"""The `qwenrun` command line: parse, call the core, render, map errors to exit codes.

Contract: this module only wires things together. It never imports llama_cpp,
huggingface_hub or pynvml at module level (so `qwenrun --help` starts fast); commands
import what they need when they run. Every `QwenrunError` becomes one line on stderr
("error: <message>" plus "hint: <hint>" when there is one) and the exit code from
`EXIT_CODES`; `QWENRUN_DEBUG=1` shows the traceback instead. Nothing imports `cli`.
"""

from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING, Literal, NoReturn

import typer

from qwenrun import __version__, config, errors

if TYPE_CHECKING:
    from qwenrun import launch

app = typer.Typer(
    name="qwenrun",
    help="Run quantized Qwen MoE models locally, with experts placed for speed.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold tokens (HF_TOKEN): never print them in a traceback.
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One table from error type to exit code; the most specific class listed wins.
EXIT_CODES: dict[type[errors.QwenrunError], int] = {
    errors.UsageError: 2,
    errors.ModelNotFoundError: 3,
    errors.InvalidModelError: 3,
    errors.UnsupportedModelError: 3,
    errors.ContextOverflowError: 4,
    errors.DoesNotFitError: 4,
    errors.DownloadError: 5,
    errors.AuthError: 5,
    errors.IntegrityError: 5,
    errors.DiskSpaceError: 5,
    errors.OfflineError: 5,
    errors.BackendError: 6,
}


def exit_code_for(err: errors.QwenrunError) -> int:
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def _version_callback(value: bool) -> None:
    if value:
        print(f"qwenrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Run quantized Qwen MoE models locally, with experts placed for speed."""


def _fail(err: errors.QwenrunError) -> NoReturn:
    line = f"error: {err.message}"
    if err.hint:
        line += f" (hint: {err.hint})"
    # One line: a message with newlines in it would read as several errors.
    print(" ".join(line.split("\n")), file=sys.stderr)
    sys.exit(exit_code_for(err))


def main() -> None:
    """Console-script entry point.

    Ctrl-C and a reader that goes away (`| head -c 1`) are handled by typer's own standalone
    mode, quietly: exit 130 and exit 1, no traceback. Only qwenrun's errors are ours to word.
    """
    try:
        app(standalone_mode=True)
    except errors.QwenrunError as err:
        if config.debug_enabled():
            traceback.print_exc()
        _fail(err)


# --------------------------------------------------------------------------------------
# Shared options of `run` and `chat`

CtxOpt = typer.Option(None, "--ctx", help="Context size in tokens (default: planned).")
MaxTokensOpt = typer.Option(None, "--max-tokens", help="Stop after this many tokens.")
TempOpt = typer.Option(None, "--temp", help="Sampling temperature (default: Qwen's preset).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling threshold.")
TopKOpt = typer.Option(None, "--top-k", help="Sample from the K most likely tokens.")
MinPOpt = typer.Option(None, "--min-p", help="Drop tokens below this share of the best.")
PresenceOpt = typer.Option(None, "--presence-penalty", help="Penalise tokens already used.")
SeedOpt = typer.Option(None, "--seed", help="Random seed for reproducible sampling.")
CpuMoeOpt = typer.Option(False, "--cpu-moe", help="Every layer's routed experts on the CPU.")
NCpuMoeOpt = typer.Option(
    None, "--n-cpu-moe", help="Routed experts of the first N layers on the CPU."
)
GpuLayersOpt = typer.Option(None, "--gpu-layers", help="Layers on the GPU (default: all).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads (default: physical cores).")
KvTypeOpt = typer.Option(None, "--kv-type", help="KV cache type: f16 (default), q8_0, q4_0.")
VerboseOpt = typer.Option(False, "--verbose", help="Stats and llama.cpp's log on stderr.")
YesOpt = typer.Option(False, "--yes", "-y", help="Download a missing model without asking.")
BudgetOpt = typer.Option(None, "--budget", help="Stop thinking after N tokens.")
SystemOpt = typer.Option(None, "--system", help="The system prompt.")


def _read_prompt(prompt: str | None) -> str:
    """The argument, with piped stdin appended as context (as Ollama does)."""
    piped = ""
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
    parts = [p for p in (prompt, piped.strip()) if p]
    if not parts:
        raise errors.UsageError(
            "no prompt given",
            hint='pass one as an argument, or pipe it in: echo "hi" | qwenrun run MODEL',
        )
    return "\n\n".join(parts)


@app.command()
def run(
    model: str = typer.Argument(
        ..., help="MODEL[:QUANT] (qwen3-30b-a3b:Q4_K_M), owner/repo:QUANT, or a .gguf file."
    ),
    prompt: str | None = typer.Argument(None, help="The prompt; piped stdin is appended."),
    ctx: int | None = CtxOpt,
    max_tokens: int | None = MaxTokensOpt,
    temp: float | None = TempOpt,
    top_p: float | None = TopPOpt,
    top_k: int | None = TopKOpt,
    min_p: float | None = MinPOpt,
    presence_penalty: float | None = PresenceOpt,
    seed: int | None = SeedOpt,
    think: bool | None = typer.Option(
        None, "--think/--no-think", help="Thinking or direct mode (default: the model's)."
    ),
    show_thinking: bool = typer.Option(
        False, "--show-thinking/--hide-thinking", help="Thinking on stderr (never on stdout)."
    ),
    budget: int | None = BudgetOpt,
    system: str | None = SystemOpt,
    cpu_moe: bool = CpuMoeOpt,
    n_cpu_moe: int | None = NCpuMoeOpt,
    gpu_layers: int | None = GpuLayersOpt,
    threads: int | None = ThreadsOpt,
    kv_type: str | None = KvTypeOpt,
    verbose: bool = VerboseOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object with answer and stats."),
    yes: bool = YesOpt,
) -> None:
    """Answer one prompt and exit: only the answer goes to stdout."""
    from qwenrun import chat as chatting
    from qwenrun import hwprobe, launch, ui

    opts = _run_options(ctx, cpu_moe, n_cpu_moe, gpu_layers, threads, kv_type, verbose, budget)
    text = _read_prompt(prompt)
    hw = hwprobe.probe(check_backend=True)  # once, for the quant to pull and the load plan
    # stdin may carry the prompt, so only a terminal on both ends can answer a question.
    path = launch.resolve_model(model, ask=not yes and _interactive(), on_notice=ui.info, hw=hw)
    engine, decision = launch.open_engine(path, opts, on_notice=ui.info, hw=hw)
    try:
        conv = chatting.Conversation.for_engine(
            engine,
            system=system,
            mode=_mode(think),
            budget=budget,
            settings=_sampling_settings(
                temp, top_p, top_k, min_p, presence_penalty, seed, max_tokens
            ),
            notice=ui.info,
        )
        if verbose:
            ui.show_startup(conv.profile.name, decision.reasons)
        out = ui.make_renderer(
            as_json=as_json,
            show_thinking=show_thinking,
            show_stats=True if verbose else None,
            extra={"placement": engine.placement.to_dict()},
        )
        chatting.one_shot(engine, conv, text, out)
    finally:
        engine.close()


def _run_options(
    ctx: int | None,
    cpu_moe: bool,
    n_cpu_moe: int | None,
    gpu_layers: int | None,
    threads: int | None,
    kv_type: str | None,
    verbose: bool,
    budget: int | None,
) -> launch.RunOptions:
    """The flags `run` and `chat` share, checked before anything is loaded."""
    from qwenrun import launch

    if budget is not None and budget < 0:
        raise errors.UsageError("--budget must be 0 or more tokens")
    opts = launch.RunOptions(
        ctx=ctx,
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        gpu_layers=gpu_layers,
        threads=threads,
        kv_type=kv_type,
        verbose=verbose,
    )
    opts.validate()
    return opts


def _mode(think: bool | None) -> Literal["think", "direct"] | None:
    return None if think is None else ("think" if think else "direct")


def _sampling_settings(
    temp: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    presence_penalty: float | None,
    seed: int | None,
    max_tokens: int | None,
) -> dict[str, float | int]:
    """The sampling flags the user gave; the rest comes from the model's preset."""
    given = dict(
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence_penalty,
        seed=seed,
        max_tokens=max_tokens,
    )
    return {k: v for k, v in given.items() if v is not None}


# --------------------------------------------------------------------------------------
# chat


@app.command()
def chat(
    model: str | None = typer.Argument(
        None, help="MODEL[:QUANT], owner/repo:QUANT or a .gguf file (default: best for you)."
    ),
    think: bool | None = typer.Option(
        None, "--think/--no-think", help="Start in thinking or direct mode (default: the model's)."
    ),
    show_thinking: bool = typer.Option(
        False, "--show-thinking/--hide-thinking", help="Keep thinking on screen, not folded."
    ),
    budget: int | None = BudgetOpt,
    system: str | None = SystemOpt,
    ctx: int | None = CtxOpt,
    max_tokens: int | None = MaxTokensOpt,
    temp: float | None = TempOpt,
    top_p: float | None = TopPOpt,
    top_k: int | None = TopKOpt,
    min_p: float | None = MinPOpt,
    presence_penalty: float | None = PresenceOpt,
    seed: int | None = SeedOpt,
    cpu_moe: bool = CpuMoeOpt,
    n_cpu_moe: int | None = NCpuMoeOpt,
    gpu_layers: int | None = GpuLayersOpt,
    threads: int | None = ThreadsOpt,
    kv_type: str | None = KvTypeOpt,
    verbose: bool = VerboseOpt,
    yes: bool = YesOpt,
) -> None:
    """Chat in the terminal: streamed answers, thinking or direct mode, /help for commands."""

    from qwenrun import chat as chatting
    from qwenrun import hwprobe, launch, ui

    opts = _run_options(ctx, cpu_moe, n_cpu_moe, gpu_layers, threads, kv_type, verbose, budget)
    # One probe serves the default model, the quant to pull and the load plan.
    hw = hwprobe.probe(check_backend=True)
    startup: tuple[str, ...] = ()
    if model is None:
        name, quant, startup = launch.default_model(hw)
        model = f"{name}:{quant}"
        ui.info(startup[0])
    path = launch.resolve_model(model, ask=not yes and _interactive(), on_notice=ui.info, hw=hw)
    with ui.load_progress() as on_progress:
        engine, decision = launch.open_engine(
            path, opts, on_progress=on_progress, on_notice=ui.info, hw=hw
        )
    settings = _sampling_settings(temp, top_p, top_k, min_p, presence_penalty, seed, max_tokens)
    conv = chatting.Conversation.for_engine(
        engine, system=system, mode=_mode(think), budget=budget, settings=settings, notice=ui.info
    )
    ui.show_startup(
        conv.profile.name, [*startup, *decision.reasons, f"context {engine.n_ctx:,} tokens"]
    )
    out = ui.make_renderer(show_thinking=show_thinking, show_stats=True if verbose else None)
    try:
        code = chatting.repl(engine, conv, out)
    finally:
        engine.close()
    raise typer.Exit(code)


@app.command("doctor")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """Check llama-cpp-python and the GPU, and say how to fix what is wrong."""
    import json

    from qwenrun import doctor

    diagnosis = doctor.collect()
    if as_json:
        print(json.dumps(diagnosis.as_dict(), indent=2))
    else:
        sys.stdout.write(doctor.render_text(diagnosis))
    # Exit 1 only when qwenrun cannot run; warnings (a GPU left unused) still exit 0.
    if not diagnosis.ok:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------
# probe and plan: what this (or another) machine can run, before any download


@app.command("probe")
def probe_command(
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of tables."),
    measure: bool = typer.Option(
        False, "--measure", help="Measure RAM bandwidth (about a second) and remember it."
    ),
) -> None:
    """Show this machine, and the best plan for each catalog model on it."""
    from qwenrun import planning

    hw = planning.probe_machine(measure=measure)
    rows = planning.catalog_rows(hw)
    if as_json:
        print(planning.probe_json(hw, rows))
        return
    from qwenrun import report

    report.show(report.hardware_table(hw))
    print()
    report.show(report.models_table(rows))


@app.command("plan")
def plan_command(
    model: str = typer.Argument(..., help="A catalog name (qwen3-30b-a3b) or a local .gguf file."),
    quant: str | None = typer.Option(None, "--quant", help="Plan this quant (default: best fit)."),
    ctx: int | None = CtxOpt,
    n_cpu_moe: int | None = NCpuMoeOpt,
    gpu_layers: int | None = GpuLayersOpt,
    kv_type: str | None = KvTypeOpt,
    gpu_mem: str | None = typer.Option(
        None, "--gpu-mem", help="Plan for a GPU with this much memory (24GiB; 0: no GPU)."
    ),
    ram: str | None = typer.Option(None, "--ram", help="Plan for this much RAM (64GiB)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of tables."),
) -> None:
    """One plan: quant, context, experts on CPU, bytes per device, speed, and why."""
    from qwenrun import offload, planning

    wishes = offload.Wishes(
        quant=quant,
        n_ctx=ctx,
        n_cpu_moe=n_cpu_moe,
        n_gpu_layers=gpu_layers,
        kv_type=kv_type,
        gpu_mem_bytes=None if gpu_mem is None else offload.parse_size(gpu_mem, "--gpu-mem"),
        ram_bytes=None if ram is None else offload.parse_size(ram, "--ram"),
    )
    wishes.validate()
    plan = planning.plan_model(model, wishes)
    if as_json:
        import json

        print(json.dumps(plan.to_dict(), indent=2))
        return
    from qwenrun import report

    report.show(report.plan_view(plan))


# --------------------------------------------------------------------------------------
# pull, list, rm: models in the Hugging Face cache


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


@app.command("pull")
def pull_command(
    model: str = typer.Argument(
        ..., help="MODEL[:QUANT]: a catalog name or owner/repo (hf.co/owner/repo), with a quant."
    ),
    yes: bool = YesOpt,
) -> None:
    """Download a model's GGUF files into the Hugging Face cache (resumable, verified)."""
    from qwenrun import download, refs, ui

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        raise errors.UsageError(
            f"{model} is a local file: nothing to download", hint=f"run it: qwenrun run {model}"
        )
    # Only a quant qwenrun chose is worth a question; one the user named is what they asked for.
    ask = ref.quant is None and not yes and _interactive()
    from qwenrun import launch

    with ui.pull_progress() as on_progress:
        paths = download.pull(
            ref,
            on_progress=on_progress,
            confirm=lambda t: ui.confirm_pull(t, ask=ask),
            choose=launch.planner_chooser(),
        )
    ui.info(f"ready: {len(paths)} file{'s' if len(paths) > 1 else ''} in the Hugging Face cache")
    for path in paths:
        print(path)


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="A JSON array instead of a table."),
) -> None:
    """Show the GGUF models in the Hugging Face cache: complete or partial, verified or not."""
    import json

    from qwenrun import download, modelcache, refs, ui

    rows = [
        {
            "reference": refs.reference_for(c.repo, c.quant),
            "repo": c.repo,
            "revision": c.revision,
            "quant": c.quant,
            "size_bytes": c.size_on_disk,
            "expected_bytes": c.expected_size,
            "status": "complete" if c.complete else "partial",
            "verified": c.verified,
            "files": len(c.paths),
            "n_files": c.n_expected,
            "path": str(c.first) if c.first else None,
        }
        for c in modelcache.cached_quants()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        ui.info(f"no models in {config.hf_hub_cache()} yet: qwenrun pull MODEL downloads one")
        return
    header = ("REFERENCE", "SIZE", "STATUS", "VERIFIED", "PATH")
    lines = [
        (
            str(r["reference"]),
            download.format_bytes(int(str(r["size_bytes"]))),
            str(r["status"])
            + ("" if r["status"] == "complete" else f" ({r['files']}/{r['n_files']} files)"),
            "yes" if r["verified"] else "no",
            str(r["path"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header) - 1)]
    for line in [header, *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1])


@app.command("rm")
def rm_command(
    model: str = typer.Argument(..., help="MODEL[:QUANT]; without a quant, every quant of it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
) -> None:
    """Delete a downloaded model from the Hugging Face cache, and say how much that frees."""
    from qwenrun import download, modelcache, refs, ui

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        raise errors.UsageError(
            f"{model} is a local file, not a downloaded model", hint="delete it yourself"
        )
    repos = {r.lower() for r in ref.repos}
    matches = [
        c
        for c in modelcache.cached_quants()
        if c.repo.lower() in repos and (ref.quant is None or c.quant.lower() == ref.quant.lower())
    ]
    if not matches:
        raise errors.ModelNotFoundError(
            f"{ref} is not downloaded", hint="qwenrun list shows what is"
        )
    removal = modelcache.plan_removal(matches)
    for c in matches:
        ui.info(f"{refs.reference_for(c.repo, c.quant)} · {download.format_bytes(c.size_on_disk)}")
    freed = download.format_bytes(removal.freed_bytes)
    if not yes:
        if not _interactive():
            raise errors.UsageError(
                f"not deleting {ref} without confirmation", hint="pass --yes to delete it"
            )
        import click

        if not click.confirm(f"Delete, freeing {freed}?", default=False, err=True):
            raise typer.Exit(1)
    removal.execute()
    print(f"deleted {ref}: {freed} freed")
