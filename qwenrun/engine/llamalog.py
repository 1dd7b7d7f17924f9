"""llama.cpp's log: one router for the process, and what the engine reads from it.

Contract: llama.cpp's log callback is process-global, so `LOG` is the one router; it keeps every
line (all levels) and echoes them to stderr when verbose. An engine marks where its load began
and reads the lines after that mark. From those lines this module reads what llama.cpp actually
did (`PlacementReport`: overridden tensors, buffer sizes, offloaded layers, tensors left in the
file) and turns a failed load into an error a user can act on. It calls llama.cpp only to set
the log callback (`LOG.install`, which `native` calls with the bindings it loaded).

How the buffer lines read: a `model` line with mmap (`CPU_Mapped`) is the span of the file
that buffer's tensors lie in, which can take in bytes another buffer holds (a tensor copied
to an extra buffer type, a lazily read tensor lying between the others). A tensor llama.cpp
reads lazily (Qwen3.8-Flash-Next's n-gram table: `lazy read enabled`) gets a mapped buffer of
its own, listed after every other model buffer (llama.cpp orders lazy contexts last): that
line is kind "lazy", mapped file and not memory. Qwen3.8-Flash-Next's indexer cache is a
second KV cache, logged after `creating indexer KV cache`: its lines are kind "kv" with part
"indexer", so `total("kv")` is both caches and `total("kv", part="indexer")` the indexer's.
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from qwenrun import errors
from qwenrun.engine.loadconfig import layer_of


@dataclass(frozen=True)
class BufferSize:
    kind: str  # "model" | "kv" | "rs" | "compute" | "output" | "lazy" (a tensor left in the file)
    buft: str  # llama.cpp's buffer name: "CPU", "CPU_Mapped", "CPU_REPACK", "CUDA0", ...
    n_bytes: int
    part: str = ""  # "indexer": the lightning indexer's cache (a "kv" buffer)


@dataclass(frozen=True)
class PlacementReport:
    """What llama.cpp says it did, read from its own log while loading."""

    n_gpu_layers: int
    cpu_moe_layers: tuple[int, ...]
    overridden_tensors: tuple[tuple[str, str], ...]
    buffers: tuple[BufferSize, ...]
    lazy_tensors: tuple[str, ...] = ()  # read from the file as needed (`lazy read enabled`)

    def total(
        self, kind: str | None = None, device: str | None = None, part: str | None = None
    ) -> int:
        """Bytes of the buffers of one kind and/or one device ("CPU" covers CPU_Mapped etc.;
        a worker's "host:port" covers each of its devices' `RPCn[host:port]` buffers), and
        of one part of a kind ("indexer") when asked."""
        return sum(
            b.n_bytes
            for b in self.buffers
            if (kind is None or b.kind == kind)
            and (device is None or _on_device(b.buft, device))
            and (part is None or b.part == part)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "cpu_moe_layers": list(self.cpu_moe_layers),
            "overridden_tensors": [{"tensor": t, "buffer": b} for t, b in self.overridden_tensors],
            "buffers": [asdict(b) for b in self.buffers],
            "lazy_tensors": list(self.lazy_tensors),
        }


def _on_device(buft: str, device: str) -> bool:
    if device.upper() == "CPU":
        # CPU, CPU_Mapped, CPU_REPACK, pinned CUDA_Host, and AMX: the CPU's AMX copies
        return buft.upper().startswith(("CPU", "AMX")) or buft.upper().endswith("_HOST")
    return buft == device or (buft.startswith("RPC") and buft.endswith(f"[{device}]"))


_OVERRIDE_RE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([\d.]+) MiB")
_OFFLOADED_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_LAZY_RE = re.compile(r"tensor (\S+) \(size = \d+ MiB\) lazy read enabled")
_INDEXER_CACHE = "creating indexer KV cache"
# How llama.cpp and ggml say that a buffer did not fit (host or device memory).
OOM_RE = re.compile(r"out of memory|failed to allocate|unable to allocate", re.IGNORECASE)
# ggml_log_level: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (ggml.h). llama-cpp-python's
# own table has these shuffled, so its `verbose=False` hides errors; we keep our own.
_LEVEL_NAMES = {1: "debug", 2: "info", 3: "warn", 4: "error"}


class _LogRouter:
    """Collects llama.cpp's log lines (all levels) and echoes them when asked to.

    llama.cpp's log callback is process-global, so there is one router; an engine marks
    where its load began and reads the lines after that mark.
    """

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.echo = False
        self._partial = ""
        self._level = 2
        self._callback: Any = None
        self._lock = threading.Lock()

    def install(self, lc: ModuleType) -> None:
        def on_log(level: int, text: bytes | None, _user: Any) -> None:
            self._write(level, (text or b"").decode("utf-8", errors="replace"))

        self._callback = lc.llama_log_callback(on_log)  # kept alive: C holds the pointer
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _write(self, level: int, text: str) -> None:
        with self._lock:
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line's level
                self._level = level
            data = self._partial + text
            *complete, self._partial = data.split("\n")
            for line in complete:
                self.lines.append((self._level, line))
                if self.echo:
                    print(line, file=sys.stderr)

    def mark(self) -> int:
        return len(self.lines)

    def since(self, mark: int) -> list[tuple[int, str]]:
        return self.lines[mark:]

    def trim(self, keep: int = 20000) -> None:
        # A long chat session must not grow this list without bound.
        if len(self.lines) > keep:
            del self.lines[: len(self.lines) - keep]


LOG = _LogRouter()


def parse_placement(lines: list[str], n_gpu_layers: int) -> PlacementReport:
    overridden: list[tuple[str, str]] = []
    buffers: list[BufferSize] = []
    lazy: list[str] = []
    indexer = False  # past the line that starts the indexer cache: its KV lines follow
    for line in lines:
        if m := _OVERRIDE_RE.search(line):
            overridden.append((m.group(1), m.group(2)))
        elif m := _BUFFER_RE.search(line):
            kind = m.group(2).lower()
            part = "indexer" if indexer and kind == "kv" else ""
            size = round(float(m.group(3)) * 1024 * 1024)
            buffers.append(BufferSize(kind, m.group(1), size, part))
        elif m := _OFFLOADED_RE.search(line):
            n_gpu_layers = int(m.group(1))
        elif m := _LAZY_RE.search(line):
            lazy.append(m.group(1))
        elif _INDEXER_CACHE in line:
            indexer = True
    if lazy:
        # The lazy tensors' own mapped buffer is the last model buffer (see the contract).
        last = max(i for i, b in enumerate(buffers) if b.kind == "model")
        buffers[last] = BufferSize("lazy", buffers[last].buft, buffers[last].n_bytes)
    # Layers whose experts went to this machine's RAM (not those sent to a worker's device).
    layers = sorted(
        {
            n
            for name, buft in overridden
            if (n := layer_of(name)) is not None and _on_device(buft, "CPU")
        }
    )
    return PlacementReport(
        n_gpu_layers, tuple(layers), tuple(overridden), tuple(buffers), tuple(lazy)
    )


def load_failure(path: Path, lines: list[str]) -> errors.QwenrunError:
    """Turn llama.cpp's own complaint into a message a user can act on."""
    text = "\n".join(lines)
    if m := re.search(r"unknown model architecture: '([^']*)'", text):
        return errors.UnsupportedModelError(
            f"{path.name}: architecture {m.group(1)!r} is not supported by this llama.cpp",
            hint="qwenrun runs Qwen3 / Qwen3-MoE / Qwen3-Next / Qwen3.5 / Qwen3.8 models",
        )
    if re.search(r"invalid magic|failed to read magic|not a gguf", text, re.IGNORECASE):
        return errors.InvalidModelError(
            f"{path.name} is not a GGUF file", hint="pass a .gguf model file"
        )
    if re.search(
        r"truncated|unexpectedly reached end of file|failed to read|not within the file bounds",
        text,
        re.IGNORECASE,
    ):
        return errors.InvalidModelError(
            f"{path.name} is truncated or corrupt",
            hint="download it again (qwenrun pull resumes and verifies)",
        )
    if OOM_RE.search(text):
        return errors.OutOfMemoryError(
            f"not enough memory to load {path.name}",
            hint="put more experts on the CPU (--n-cpu-moe) or use a smaller quant",
        )
    reason = next(
        (ln.split(":", 1)[-1].strip() for ln in reversed(lines) if "error" in ln.lower()),
        "see the log with --verbose",
    )
    return errors.InvalidModelError(f"llama.cpp could not load {path.name}: {reason}")
