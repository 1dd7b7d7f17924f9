"""Download throughput: qwenrun's pull against plain `hf_hub_download`, on a loopback hub.

One random file of a few hundred MB is served by `qwenrun.testing.hub_server` in its own
process (zero-copy `sendfile`), and fetched into a fresh Hugging Face cache per run by:

- hf:      `huggingface_hub.hf_hub_download(repo, file)` (HEAD, GET; no hash check);
- qwenrun: `pull.pull("owner/repo:QUANT")` (model info, HEAD, GET, the sha256 check
           against the listed LFS hash and its record), i.e. with verification included.

Each round runs both, alternating which goes first; the figure is the median over rounds of
qwenrun's MB/s divided by hf's (target ≥ 0.95). With `--write`, the section "Download
throughput" of benchmarks/RESULTS.md is replaced (and only that section).

    python benchmarks/download_throughput.py [--size-mb 400] [--rounds 5] [--dir DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = "bench/Throughput-GGUF"
FILE = "Throughput-Q4_K_M.gguf"
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Download throughput"


def make_file(path: Path, size: int) -> None:
    """Random bytes (incompressible), written in 16 MiB blocks."""
    block = 16 << 20
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def start_hub(local: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenrun.testing.hub_server", REPO, f"{FILE}={local}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    return proc, url


def time_hf(url: str, root: Path) -> float:
    from huggingface_hub import hf_hub_download

    cache = root / "hf-cache"
    t0 = time.perf_counter()
    hf_hub_download(REPO, FILE, cache_dir=cache, endpoint=url)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(cache)
    return elapsed


def time_qwenrun(url: str, root: Path) -> float:
    from qwenrun.hub import pull

    os.environ["HF_ENDPOINT"] = url
    os.environ["HF_HOME"] = str(root / "hf-home")
    os.environ["QWENRUN_HOME"] = str(root / "qwenrun-home")
    t0 = time.perf_counter()
    (path,) = pull.pull(f"{REPO}:Q4_K_M")
    elapsed = time.perf_counter() - t0
    assert path.exists()
    shutil.rmtree(root / "hf-home")
    shutil.rmtree(root / "qwenrun-home")
    return elapsed


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} logical CPUs, {cpu}"


@dataclass(frozen=True)
class Result:
    size: int
    rounds: int
    where: str
    hf_s: list[float]
    qwenrun_s: list[float]

    @property
    def ratios(self) -> list[float]:
        # qwenrun's MB/s divided by hf's, per round (same bytes: the inverse time ratio)
        return [h / q for h, q in zip(self.hf_s, self.qwenrun_s, strict=True)]

    def mbps(self, seconds: list[float]) -> float:
        return self.size / statistics.median(seconds) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dir",
        default=None,
        help="where the file and caches go (a tmpfs "
        "such as /dev/shm keeps disk write-back out of the figures)",
    )
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # neither side draws a bar: only bytes are timed
    size = args.size_mb * 1_000_000
    hf_s: list[float] = []
    qr_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="qwenrun-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        local = root / FILE
        make_file(local, size)
        hub, url = start_hub(local)
        try:
            time_hf(url, root)  # warm-up: page cache, connections, imports
            time_qwenrun(url, root)
            for i in range(args.rounds):
                order = [("hf", time_hf), ("qwenrun", time_qwenrun)]
                if i % 2:
                    order.reverse()
                for name, fn in order:
                    (hf_s if name == "hf" else qr_s).append(fn(url, root))
        finally:
            assert hub.stdin is not None
            hub.stdin.close()
            hub.wait(timeout=10)
    where = args.dir or tempfile.gettempdir()
    result = Result(size, args.rounds, where, hf_s, qr_s)
    report = render(result, args.size_mb)
    print(report)
    if args.write:
        write_section(report)


def render(r: Result, size_mb: int) -> str:
    cmd = f"python benchmarks/download_throughput.py --size-mb {size_mb} --rounds {r.rounds}"
    if r.where != tempfile.gettempdir():
        cmd += f" --dir {r.where}"
    median = statistics.median(r.ratios)
    verdict = "met" if median >= 0.95 else "NOT met"
    about = (
        f"`{cmd}` — {datetime.date.today().isoformat()}, {machine()}, "
        f"Python {platform.python_version()}. One random {r.size / 1e6:.0f} MB file served by "
        "the loopback hub in its own process (sendfile), fetched into a fresh HF cache in "
        f"{r.where} per run; the two downloaders alternate order each round. qwenrun's time "
        "includes its model-info request and the sha256 check (hashed in a second thread "
        "while the bytes arrive); hf_hub_download checks no hash. Single rounds wander on a "
        "shared 2-core machine (server, client and hash thread compete for the cores); the "
        "figure is the median of the per-round ratios."
    )
    return "\n".join(
        [
            HEADING,
            "",
            textwrap.fill(about, width=100, break_on_hyphens=False, break_long_words=False),
            "",
            "| downloader | median MB/s | ratio to hf_hub_download: median (min–max) |",
            "|---|---|---|",
            f"| `hf_hub_download` | {r.mbps(r.hf_s):.0f} | 1.000 |",
            f"| qwenrun pull (verified) | {r.mbps(r.qwenrun_s):.0f} | "
            f"**{median:.3f}** ({min(r.ratios):.3f}–{max(r.ratios):.3f}) |",
            "",
            f"Target ≥ 0.95: {verdict}.",
            "",
        ]
    )


def write_section(report: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(report + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + report
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
