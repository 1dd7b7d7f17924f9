"""Progress and questions during start-up: loading weights, downloads, confirmations.

Contract: presentation only. `load_progress` and `pull_progress` are context managers that yield
callbacks for the engine and the downloader (bars on a terminal stderr; elsewhere nothing while
loading and a line per file while pulling); `pull_progress` draws nothing until the downloader
reports work, and the downloader reports only real work (bytes moving, or a cached file hashed
for the first time: "verifying"), so a model already there and verified shows no bar.
`confirm_pull` says on stderr what will be fetched and its size, before the first byte, and,
when asked to, asks. `check_status` is a spinner on a terminal while the once-per-machine CPU
kernel check runs (seconds of silence otherwise). `StartupHooks` bundles them for
`launch.start`, which prints nothing itself. Whether a model is already downloaded is decided by
the downloader (`PullTarget.cached`), not here. `bench_progress` shows each bench run's speeds
as it finishes and an estimate of the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

from rich.text import Text

from qwenrun import units
from qwenrun.ui.console import console, info

if TYPE_CHECKING:
    from qwenrun.bench.runner import Run
    from qwenrun.hub.listing import PullTarget
    from qwenrun.hub.transfer import PullProgress


@contextmanager
def load_progress(label: str = "Loading weights") -> Iterator[Callable[[float], None]]:
    """A progress bar on a terminal stderr while llama.cpp loads; a no-op callback elsewhere.

    Yields the callback for `Engine.load(on_progress=...)` (fractions 0.0 to 1.0).
    """
    con = console()
    if not con.is_terminal:
        yield lambda _p: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
    )
    task = progress.add_task(label, total=1.0)
    with progress:
        yield lambda p: progress.update(task, completed=min(max(p, 0.0), 1.0))


def confirm_pull(target: PullTarget, *, ask: bool) -> bool:
    """Say what will be fetched and its size (always, so a script's log shows it before the
    first byte); ask only when `ask` (a terminal on both ends, no --yes)."""
    n = len(target.quant.files)
    what = (
        f"{target.reference} · {target.repo} · {units.gb(target.total_size)}"
        f" in {n} file{'s' if n > 1 else ''}"
    )
    if target.cached:
        info(f"{what} · already downloaded")
        return True
    info(what)
    if not ask:
        return True
    import typer

    return typer.confirm("Download it?", default=True, err=True)


@contextmanager
def pull_progress() -> Iterator[Callable[[PullProgress], None]]:
    """One progress bar for the whole quant on a terminal; a line per file elsewhere."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    con = console()
    progress: Progress | None = None
    task = None
    last_file = (0, "")

    def on_progress(p: PullProgress) -> None:
        nonlocal progress, task, last_file
        verb = "verifying" if p.phase == "verify" else "downloading"
        label = f"{verb} {p.file_index}/{p.n_files} {p.file.rsplit('/', 1)[-1]}"
        if not con.is_terminal:
            if (p.file_index, p.phase) != last_file:
                last_file = (p.file_index, p.phase)
                info(label)
            return
        if progress is None:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=False),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=con,
                transient=False,
            )
            progress.start()
            # Start at the bytes already there, so a resumed pull's speed is not inflated.
            task = progress.add_task(label, total=p.total_bytes, completed=p.done_bytes)
        assert task is not None
        progress.update(task, description=label, completed=p.done_bytes)

    try:
        yield on_progress
    finally:
        if progress is not None:
            progress.stop()


class StartupHooks:
    """What `launch.start` shows and asks on this terminal (see `launch.Hooks`)."""

    def __init__(self, *, ask: bool) -> None:
        self.ask = ask

    def notice(self, text: str) -> None:
        info(text)

    def confirm_pull(self, target: PullTarget) -> bool:
        return confirm_pull(target, ask=self.ask)

    def pulling(self) -> AbstractContextManager[Callable[[PullProgress], None]]:
        return pull_progress()

    def loading(self) -> AbstractContextManager[Callable[[float], None]]:
        return load_progress()

    def checking(self, text: str) -> AbstractContextManager[object]:
        return check_status(text)


@contextmanager
def check_status(text: str) -> Iterator[None]:
    """A spinner with `text` on a terminal stderr while the CPU kernel check runs (gone once
    it is done); nothing elsewhere: a script's stderr gets no progress chatter."""
    con = console()
    if not con.is_terminal:
        yield
        return
    with con.status(text, spinner="dots"):
        yield


def _time_left(elapsed: float, done: int, total: int) -> str:
    """`about 3 min left`: the runs so far took about as long as the ones to come will."""
    seconds = elapsed / done * (total - done)
    if seconds < 90:
        return f"about {max(seconds, 1):.0f} s left"
    return f"about {seconds / 60:.0f} min left"


def _bench_result(last: Run) -> str:
    if not last.ok:
        return f"failed: {last.error}"
    return f"decode {last.decode_tok_s:.1f} tok/s, prefill {last.prefill_tok_s:,.0f} tok/s"


@contextmanager
def bench_progress() -> Iterator[Callable[[int, int, str, Run | None], None]]:
    """`qwenrun bench`: each run's speeds as it finishes, and an estimate of the time left
    (from the runs so far); a bar over every run on a terminal, plain lines elsewhere."""
    con = console()
    started = time.monotonic()
    running = [""]  # what the run in progress measures

    def left(done: int, total: int) -> str:
        return _time_left(time.monotonic() - started, done, total) if done < total else ""

    if not con.is_terminal:

        def line(done: int, total: int, what: str, last: Run | None) -> None:
            if last is not None:  # under its "run N/M: …" line
                info("  " + " · ".join(filter(None, (_bench_result(last), left(done, total)))))
            if done < total:
                info(f"run {done + 1}/{total}: {what}")

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[left]}"),
        console=con,
        transient=True,
    )
    task = progress.add_task("bench", total=None, left="")
    with progress:

        def update(done: int, total: int, what: str, last: Run | None) -> None:
            if last is not None:  # kept above the bar
                result = f"run {done}/{total} · {running[0]} · {_bench_result(last)}"
                progress.console.print(Text(result, style="dim"))
            running[0] = what
            eta = left(done, total) if last is not None else ""
            progress.update(task, total=total, completed=done, description=what, left=eta)

        yield update
