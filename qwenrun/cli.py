"""The `qwenrun` command line: parse, call the core, render, map errors to exit codes.

Contract: this module only wires things together: typer commands, each a few lines that
call `launch`, `offload`, the hub or `doctor` and hand the result to `ui`. The options
commands share are declared once in `flags.py` (`PlaceFlags`, `LoadFlags`, `ChatFlags`,
given to a command by `with_flags`). It never imports llama_cpp, huggingface_hub or
pynvml at module level (so `qwenrun --help` starts fast); commands import what they need
when they run. Every `QwenrunError` becomes
one line on stderr ("error: <message>" plus "hint: <hint>" when there is one; a declined
question, `Declined`, its message alone) and the exit code from `EXIT_CODES`, and after
`--json` also `{"error": {"message", "hint", "code"}}` on stdout; `QWENRUN_DEBUG=1` shows the
traceback too. The standard streams are set up once first (`ui.stdio`). Nothing imports `cli`.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
import typing
from dataclasses import fields
from typing import TYPE_CHECKING, NoReturn

import typer

from qwenrun import __version__, config, errors
from qwenrun.flags import SERVER, ChatFlags, LoadFlags, PlaceFlags, with_flags
from qwenrun.ui import helptext, stdio

if TYPE_CHECKING:
    from qwenrun.engine.llama import Engine
    from qwenrun.launch import Started
    from qwenrun.serve.client import RemoteModel

app = helptext.App(  # plain help at the terminal's width, the usual metavars
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
    errors.Declined: 1,  # the user said no: not an error, but the command did not do its job
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
    errors.WorkerError: 7,  # also the status of a worker lost mid-answer (engine/rpc.py)
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
    # A declined question is the user's choice: said plainly, not as an error.
    line = err.message if isinstance(err, errors.Declined) else f"error: {err.message}"
    if err.hint:
        line += f" (hint: {err.hint})"
    # One line: a message with newlines in it would read as several errors.
    print(" ".join(line.split("\n")), file=sys.stderr)
    code = exit_code_for(err)
    if stdio.json_asked() and not isinstance(err, errors.OutputError):
        # A script that asked for JSON reads the failure as JSON too (stdout; stderr as ever).
        doc = {"error": {"message": err.message, "hint": err.hint, "code": code}}
        stdio.write_last(json.dumps(doc) + "\n")  # ASCII: a path may hold any bytes
    sys.exit(code)


def main() -> None:
    """Console-script entry point.

    Ctrl-C and a reader that goes away (`| head -c 1`) are handled by typer's own standalone
    mode, quietly: exit 130 and exit 1, no traceback. Only qwenrun's errors are ours to word.
    The command runs under `engine.crash.supervise`, so that even llama.cpp dying by a
    signal (an illegal instruction, the OOM killer) ends with one line saying what to try.
    """
    from qwenrun.engine import crash

    crash.supervise(_main)


def _main() -> None:
    stdio.setup()  # stdin keeps bytes that are not UTF-8 for text.clean; a stdout that fails
    try:  # to write (a full disk) is one OutputError
        try:
            app(standalone_mode=True)
        except SystemExit:
            stdio.flush()  # the last output, while its failure can still be said in one line
            raise
    except errors.QwenrunError as err:
        if config.debug_enabled():
            traceback.print_exc()
        _fail(err)


# --------------------------------------------------------------------------------------
# run and chat


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _start(model: str | None, place: PlaceFlags, load: LoadFlags) -> Started:
    """The one start-up of `run` and `chat`, with this terminal's questions and progress."""
    from qwenrun import launch
    from qwenrun.ui.progress import StartupHooks

    wishes = place.wishes()
    wishes.validate()  # before anything is probed, pulled or loaded
    prompt_cache = load.prompt_cache_bytes()
    # stdin may carry the prompt, so only a terminal on both ends can answer a question.
    hooks = StartupHooks(ask=not load.yes and _interactive())
    return launch.start(model, wishes, hooks=hooks, verbose=load.verbose, prompt_cache=prompt_cache)


@app.command()
@with_flags
def run(
    model: str = typer.Argument(
        ..., help="MODEL[:QUANT] (qwen3-30b-a3b:Q4_K_M), owner/repo:QUANT, or a .gguf file."
    ),
    prompt: str | None = typer.Argument(None, help="The prompt; piped stdin comes before it."),
    as_json: bool = stdio.json_option("One JSON object with answer and stats."),
    server: str | None = SERVER,
    *,
    place: PlaceFlags,
    load: LoadFlags,
    talk: ChatFlags,
) -> None:
    """Answer one prompt and exit: only the answer goes to stdout."""
    from qwenrun import chat
    from qwenrun.ui import console, render
    from qwenrun.ui import talk as here

    talk.validate()
    text = here.read_prompt(prompt)  # piped stdin, then the argument; cleaned
    if server:
        remote = _connect(server, model, place, load)
        conv = remote.conversation(**talk.conversation())
        if load.verbose:
            console.show_startup(
                conv.profile.name, remote.reasons(), facts=here.remote_facts(remote)
            )
        out = render.make_renderer(
            as_json=as_json,
            show_thinking=talk.show_thinking,
            show_stats=True if load.verbose else None,
            extra={"placement": remote.placement(), "server": remote.url},
        )
        chat.one_shot(remote, conv, text, out)
        return
    here.answer_once(_start(model, place, load), text, talk, as_json=as_json, verbose=load.verbose)


@app.command("chat")
@with_flags
def chat_command(
    model: str | None = typer.Argument(
        None, help="MODEL[:QUANT], owner/repo:QUANT or a .gguf file (default: best for you)."
    ),
    server: str | None = SERVER,
    *,
    place: PlaceFlags,
    load: LoadFlags,
    talk: ChatFlags,
) -> None:
    """Chat in the terminal: streamed answers, thinking or direct mode, /help for commands."""
    from qwenrun.ui import console, render, repl
    from qwenrun.ui import talk as here

    talk.validate()
    if server:
        remote = _connect(server, model, place, load)
        conv = remote.conversation(**talk.conversation())
        lines, facts = remote.reasons() if load.verbose else (), here.remote_facts(remote)
        console.show_startup(conv.profile.name, lines, facts=facts)
        out = render.make_renderer(
            show_thinking=talk.show_thinking, show_stats=True if load.verbose else None
        )
        # The REPL asks its engine only for n_ctx and cached_tokens and hands it to
        # chat.run_turn, which lets a server's model (a chat.TurnServer) run the turn.
        raise typer.Exit(repl.repl(typing.cast("Engine", remote), conv, out))
    raise typer.Exit(here.chat_here(_start(model, place, load), talk, verbose=load.verbose))


def _connect(server: str, model: str | None, place: PlaceFlags, load: LoadFlags) -> RemoteModel:
    """`--server`: the server's model, after refusing what only a local load could honour."""
    from qwenrun.serve.client import RemoteModel

    # Each field's default is the typer option's default: anything else was given.
    local_only = [
        "--" + f.name.replace("_", "-")
        for group in (place, load)
        for f in fields(group)
        if f.name not in ("verbose", "yes")
        and getattr(group, f.name) != getattr(f.default, "default", f.default)
    ]
    if local_only:
        raise errors.UsageError(
            f"{', '.join(local_only)}: only for loading a model here; with --server the "
            "server's model is already loaded",
            hint="give them to qwenrun serve, or leave --server out",
        )
    remote = RemoteModel.connect(server)
    remote.check_model(model)
    return remote


# --------------------------------------------------------------------------------------
# serve and ps: the model kept loaded behind an OpenAI-compatible API


@app.command("serve")
@with_flags
def serve_command(
    model: str | None = typer.Argument(
        None, help="MODEL[:QUANT], owner/repo:QUANT or a .gguf file (default: best for you)."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="QWENRUN_API_KEY",
        help="Answer only requests with this key (Authorization: Bearer KEY; $QWENRUN_API_KEY).",
    ),
    queue: int = typer.Option(
        8, "--queue", help="Requests that may wait while one generates (more get 503)."
    ),
    *,
    place: PlaceFlags,
    load: LoadFlags,
) -> None:
    """Keep the model loaded behind an OpenAI-compatible API: chat, tools, thinking."""
    import time

    from qwenrun.serve import server as serve_server
    from qwenrun.serve.enginethread import Worker
    from qwenrun.serve.runner import ServedModel
    from qwenrun.serve.state import ServerState
    from qwenrun.ui import console
    from qwenrun.ui.talk import plan_facts

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)

    if queue < 0:
        raise errors.UsageError("--queue must be 0 or more")
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        # Refused, not taken as "no key": `--api-key "$KEY"` with KEY unset means a key was
        # wanted, and serving without one (maybe beyond loopback) would be the silent
        # opposite. Spaces around a key: HTTP strips them from the header, so none matches.
        raise errors.UsageError(
            "--api-key (or QWENRUN_API_KEY) is empty or has spaces around it: no client "
            "could send that key",
            hint="give the key clients must send, or leave --api-key out to serve without one",
        )
    place.wishes().validate()  # before the port is taken
    model_id = serve_server.served_id(model)  # the API's name for it, from now on
    sock = serve_server.bind(host, port)
    state = ServerState(
        model_id=model_id,
        worker=Worker(queue, log=log),
        api_key=api_key,
        log=log,
    )
    srv = serve_server.Server(state, sock)
    if not serve_server.is_loopback(host) and not api_key:
        console.info(
            f"warning: listening on {host} without an API key: anyone who can reach this "
            "machine can use the model (set --api-key or QWENRUN_API_KEY)",
            style="yellow",
        )
    with srv:
        console.info(f"qwenrun serve: {srv.listening}")
        started = _start(model, place, load)
        served = ServedModel.from_engine(started.engine, model_id, started.reasons)
        try:  # from here on, Ctrl-C is the way to stop: not an interrupted command
            state.ready(served)
            console.show_startup(
                served.profile.name,
                [
                    *(started.reasons if load.verbose else ()),
                    f"ready: {srv.url}/v1 serves it as {served.id} · Ctrl-C stops",
                ],
                facts=plan_facts(started.plan, served.engine.n_ctx),
            )
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
    console.info("qwenrun serve: stopped")


@app.command("ps")
def ps_command(
    server: str | None = typer.Option(
        None,
        "--server",
        envvar="QWENRUN_SERVER",
        help="The server to ask (URL, or $QWENRUN_SERVER; default http://127.0.0.1:8080).",
    ),
    as_json: bool = stdio.json_option("One JSON object instead of text."),
) -> None:
    """Show what a qwenrun server has loaded (default: the one on this machine)."""
    import json

    from qwenrun.serve import client

    url = client.Endpoint.parse(server or client.DEFAULT_URL).url
    models = client.list_models(url)
    if as_json:
        print(json.dumps({"server": url, "models": models}, indent=2))
        return
    from qwenrun.ui import tables

    tables.print_served(url, models)


@app.command("bench")
@with_flags
def bench_command(
    model: str | None = typer.Argument(
        None, help="MODEL[:QUANT] or a .gguf file (default: the model `chat` would pick)."
    ),
    rounds: int = typer.Option(3, "--rounds", help="Runs of each placement, alternated."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens evaluated per run."),
    gen: int = typer.Option(128, "--gen", help="Tokens decoded per run."),
    show: bool = typer.Option(False, "--show", help="List the results kept for this machine."),
    as_json: bool = stdio.json_option("Every run as JSON."),
    *,
    place: PlaceFlags,
    load: LoadFlags,
) -> None:
    """Measure the planned placement and its neighbours on this machine; the plan learns."""
    import json

    from qwenrun import hwprobe
    from qwenrun.bench import measure, runner
    from qwenrun.ui import console, progress, tables

    if show:
        groups = measure.stored(hwprobe.probe())
        if as_json:
            print(json.dumps([g.__dict__ for g in groups], indent=2))
        elif not groups:
            console.info("nothing measured on this machine yet: qwenrun bench MODEL measures")
        else:
            tables.show_bench_stored(groups)
        return
    settings = runner.BenchSettings(prompt_tokens=prompt, gen_tokens=gen, rounds=rounds)
    hooks = progress.StartupHooks(ask=not load.yes and _interactive())
    with progress.bench_progress() as on_progress:
        report = measure.measure(
            model, place.wishes(), settings, hooks=hooks, on_progress=on_progress
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    tables.show_bench_report(report)
    if report.not_kept:
        console.info(f"not kept for later plans: {report.not_kept}", style="yellow")
    else:
        console.info(
            f"kept under {measure.store.runs_file()}; the speed model is now fitted to "
            f"{report.calibrated_on} runs of this machine"
        )


@app.command("worker")
def worker_command(
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="IPv4 address to listen on (0.0.0.0: every interface; no authentication!).",
    ),
    port: int = typer.Option(50052, "--port", help="Port to listen on."),
    cache: str | None = typer.Option(
        None, "--cache", help="Folder that keeps sent weights (default: QWENRUN_HOME/rpc-cache)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep no weights between loads."),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads for the CPU's share (default: physical cores)."
    ),
) -> None:
    """Serve this machine's GPUs and RAM to other qwenrun processes (llama.cpp RPC)."""
    from pathlib import Path

    from qwenrun import worker
    from qwenrun.ui import console

    folder = None if no_cache else Path(cache).expanduser() if cache else worker.default_cache_dir()
    settings = worker.WorkerSettings(host=host, port=port, cache_dir=folder, threads=threads)
    worker.serve(
        settings,
        out=lambda line: print(line, flush=True),
        err=lambda line: console.info(line, style="yellow"),
    )


@app.command("doctor")
def doctor_command(
    as_json: bool = stdio.json_option("One JSON object instead of text."),
) -> None:
    """Check llama-cpp-python and the GPU, and say how to fix what is wrong."""
    import json

    from qwenrun.engine import doctor
    from qwenrun.ui import progress

    diagnosis = doctor.collect(checking=progress.check_status)
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
    as_json: bool = stdio.json_option("One JSON object instead of tables."),
    measure: bool = typer.Option(
        False, "--measure", help="Measure RAM bandwidth (about a second) and remember it."
    ),
) -> None:
    """Show this machine, and the best plan for each catalog model on it."""
    from qwenrun import offload
    from qwenrun.machine import machine
    from qwenrun.ui import console, progress, tables

    hw = machine(measure=measure, checking=progress.check_status)
    rows = tables.model_rows(offload.plan_catalog(hw))
    if as_json:
        print(tables.probe_json(hw, rows))
        return
    console.show(tables.hardware_table(hw))
    print()
    console.show(tables.models_table(rows))


# A list option's default cannot be written in the signature (ruff B008 for lists).
_WORKER = typer.Option(
    None,
    "--worker",
    help="Plan with a worker machine too: its GPUs and RAM, GPU[,GPU…]/RAM (24GiB/128GiB).",
)


@app.command("plan")
@with_flags
def plan_command(
    model: str = typer.Argument(
        ..., help="MODEL[:QUANT] (qwen3-30b-a3b), owner/repo[:QUANT], or a local .gguf file."
    ),
    quant: str | None = typer.Option(None, "--quant", help="Plan this quant (default: best fit)."),
    gpu_mem: str | None = typer.Option(
        None,
        "--gpu-mem",
        help="Plan for GPUs with this much memory, one size each (24GiB,12GiB; 0: no GPU).",
    ),
    worker: list[str] | None = _WORKER,
    ram: str | None = typer.Option(None, "--ram", help="Plan for this much RAM (64GiB)."),
    as_json: bool = stdio.json_option("One JSON object instead of tables."),
    *,
    place: PlaceFlags,
) -> None:
    """One plan: quant, context, experts on CPU, bytes per device, speed, and why."""

    from qwenrun import offload, units
    from qwenrun.bench import store
    from qwenrun.machine import machine
    from qwenrun.ui import progress

    wishes = place.wishes(
        quant=quant,
        gpu_mem_bytes=None if gpu_mem is None else units.parse_sizes(gpu_mem, "--gpu-mem"),
        workers=tuple(units.parse_worker(w, "--worker") for w in worker or ()),
        ram_bytes=None if ram is None else units.parse_size(ram, "--ram"),
    )
    wishes.validate()
    # A question about another GPU does not need to know whether this build can use one.
    hw = machine(
        backend=wishes.gpu_mem_bytes is None, rpc=wishes.rpc, checking=progress.check_status
    )
    plan = offload.plan_reference(model, wishes, hw, functools.partial(store.measured, hw))
    if as_json:
        import json

        print(json.dumps(plan.to_dict(), indent=2))
        return
    from qwenrun.ui import console, tables

    console.show(tables.plan_view(plan))


# --------------------------------------------------------------------------------------
# pull, list, rm: models in the Hugging Face cache


@app.command("pull")
def pull_command(
    model: str = typer.Argument(
        ..., help="MODEL[:QUANT]: a catalog name or owner/repo (hf.co/owner/repo), with a quant."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Download without asking."),
) -> None:
    """Download a model's GGUF files into the Hugging Face cache (resumable, verified)."""
    from qwenrun import offload
    from qwenrun.hub import pull, refs
    from qwenrun.machine import machine
    from qwenrun.ui import console, progress

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        raise errors.UsageError(
            f"{model} is a local file: nothing to download", hint=f"run it: qwenrun run {model}"
        )
    # Only a quant qwenrun chose is worth a question; one the user named is what they asked for.
    ask = ref.quant is None and not yes and _interactive()
    with progress.pull_progress() as on_progress:
        paths = pull.pull(
            ref,
            on_progress=on_progress,
            confirm=lambda t: progress.confirm_pull(t, ask=ask),
            # The machine is read only when there is a quant to choose.
            choose=lambda ref, listing: offload.planner_chooser(
                machine(checking=progress.check_status)
            )(ref, listing),
        )
    console.info(
        f"ready: {len(paths)} file{'s' if len(paths) > 1 else ''} in the Hugging Face cache"
    )
    for path in paths:
        print(path)


@app.command("list")
def list_command(
    as_json: bool = stdio.json_option("A JSON array instead of a table."),
) -> None:
    """Show the GGUF models in the Hugging Face cache: complete or partial, verified or not."""
    import json

    from qwenrun.hub import cache
    from qwenrun.ui import console, tables

    rows = tables.cache_rows(cache.cached_quants())
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.info(f"no models in {config.hf_hub_cache()} yet: qwenrun pull MODEL downloads one")
        return
    tables.print_cache(rows)


@app.command("rm")
def rm_command(
    model: str = typer.Argument(..., help="MODEL[:QUANT]; without a quant, every quant of it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
) -> None:
    """Delete a downloaded model from the Hugging Face cache, and say how much that frees."""
    from qwenrun import units
    from qwenrun.hub import cache, refs
    from qwenrun.ui import console

    ref = refs.parse_ref(model)
    if ref.kind == "file":
        raise errors.UsageError(
            f"{model} is a local file, not a downloaded model", hint="delete it yourself"
        )
    matches = cache.matching(ref.repos, ref.quant)
    if not matches:
        raise errors.ModelNotFoundError(
            f"{ref} is not downloaded", hint="qwenrun list shows what is"
        )
    removal = cache.plan_removal(matches)
    for c in matches:
        console.info(f"{refs.reference_for(c.repo, c.quant)} · {units.gb(c.size_on_disk)}")
    freed = units.gb(removal.freed_bytes)
    if not yes:
        if not _interactive():
            raise errors.UsageError(
                f"not deleting {ref} without confirmation", hint="pass --yes to delete it"
            )
        if not typer.confirm(f"Delete, freeing {freed}?", default=False, err=True):
            raise typer.Exit(1)
    removal.execute()
    print(f"deleted {ref}: {freed} freed")
