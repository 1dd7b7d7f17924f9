"""The llama.cpp engine: load a GGUF with a placement, stream tokens, report what it did.

Contract: this is the only module that imports `llama_cpp`, and it does so lazily (inside
functions), so `qwenrun --help` and the planner never pay for it. It uses the low-level
bindings of llama-cpp-python 0.3.36 only:

- placement: llama.cpp's tensor buffer-type overrides, an array of `{pattern, buft}` structs
  that the bindings declare as an untyped pointer; the array and its strings are kept alive
  for the model's life;
- decoding: `llama_decode` on a reused one-token batch, a native sampler chain, and
  `llama_token_to_piece`, with nothing in the per-token loop that the loop does not need;
- the KV cache persists across `generate` calls; a new prompt evaluates only the tokens
  after the common prefix with what the cache holds;
- llama.cpp's log goes through our callback (shown only when verbose), and the engine reads
  from it what llama.cpp actually placed where: overridden tensors and buffer sizes.

It does not choose a placement (offload.py does), render templates (chat.py) or print.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from qwenrun import errors
from qwenrun.placement import LoadConfig

# --------------------------------------------------------------------------------------
# Plain values the rest of qwenrun sees


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenStats:
    prompt_tokens: int
    eval_prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_wall_ms: float
    llama_eval_ms: float
    llama_sample_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BufferSize:
    kind: str  # "model" | "kv" | "rs" | "compute" | "output"
    buft: str  # llama.cpp's buffer name: "CPU", "CPU_Mapped", "CPU_REPACK", "CUDA0", ...
    n_bytes: int


@dataclass(frozen=True)
class PlacementReport:
    """What llama.cpp says it did, read from its own log while loading."""

    n_gpu_layers: int
    cpu_moe_layers: tuple[int, ...]
    overridden_tensors: tuple[tuple[str, str], ...]
    buffers: tuple[BufferSize, ...]

    def total(self, kind: str | None = None, device: str | None = None) -> int:
        """Bytes of the buffers of one kind and/or one device ("CPU" covers CPU_Mapped etc.)."""
        return sum(
            b.n_bytes
            for b in self.buffers
            if (kind is None or b.kind == kind) and (device is None or _on_device(b.buft, device))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "cpu_moe_layers": list(self.cpu_moe_layers),
            "overridden_tensors": [{"tensor": t, "buffer": b} for t, b in self.overridden_tensors],
            "buffers": [asdict(b) for b in self.buffers],
        }


def _on_device(buft: str, device: str) -> bool:
    if device.upper() == "CPU":
        return buft.upper().startswith("CPU") or buft.upper().endswith("_HOST")
    return buft == device


@dataclass(frozen=True)
class ModelMeta:
    path: str
    arch: str
    n_layer: int
    n_ctx_train: int
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    is_recurrent: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# llama_cpp, loaded on first use


_lc: ModuleType | None = None
_init_lock = threading.Lock()


def _llama() -> ModuleType:
    """Import the bindings once, init the backend, and route llama.cpp's log to us."""
    global _lc
    if _lc is not None:
        return _lc
    with _init_lock:
        if _lc is None:
            import llama_cpp.llama_cpp as lc

            lc.llama_backend_init()
            _LOG.install(lc)
            _bind_ggml(lc)
            _lc = lc
    return _lc


def supports_gpu_offload() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (CUDA, Metal, ...)."""
    return bool(_llama().llama_supports_gpu_offload())


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


# ggml's device registry is exported by the libraries the wheel ships, but not bound by
# llama-cpp-python. `libllama` lists libggml and libggml-base as DT_NEEDED, so dlsym on its
# handle finds these symbols without loading anything else.
_GGML_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ggml_backend_dev_count": ([], ctypes.c_size_t),
    "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_dev_buffer_type": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_buft_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_cpu_buffer_type": ([], ctypes.c_void_p),
}
_ggml: dict[str, Any] = {}


def _bind_ggml(lc: ModuleType) -> None:
    for name, (argtypes, restype) in _GGML_SIGNATURES.items():
        fn = getattr(lc._lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        _ggml[name] = fn


def buffer_types() -> dict[str, int]:
    """Buffer type name → handle for every device llama.cpp sees ("CPU", "CUDA0", ...)."""
    _llama()
    out: dict[str, int] = {}
    for i in range(_ggml["ggml_backend_dev_count"]()):
        buft = _ggml["ggml_backend_dev_buffer_type"](_ggml["ggml_backend_dev_get"](i))
        if buft:
            out[_ggml["ggml_backend_buft_name"](buft).decode()] = buft
    # The CPU override must be exactly this handle: the loader then picks from the CPU
    # buffer-type list, so repacked CPU layouts still apply to overridden experts.
    out["CPU"] = _ggml["ggml_backend_cpu_buffer_type"]()
    return out


class _OverrideStruct(ctypes.Structure):
    # struct llama_model_tensor_buft_override {
    #     const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _override_array(patterns: list[tuple[str, str]]) -> tuple[Any, list[bytes]]:
    """A NULL-terminated override array, plus the pattern bytes it points into."""
    bufts = buffer_types()
    encoded = []
    arr = (_OverrideStruct * (len(patterns) + 1))()  # zeroed last entry terminates
    for i, (pattern, buft_name) in enumerate(patterns):
        buft = bufts.get(buft_name) or bufts.get(buft_name.upper())
        if buft is None:
            raise errors.UsageError(
                f"unknown buffer type {buft_name!r} in override {pattern!r}",
                hint=f"this llama.cpp build has: {', '.join(sorted(bufts))}",
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise errors.UsageError(f"bad override pattern {pattern!r}: {exc}") from None
        b = pattern.encode()
        encoded.append(b)
        arr[i].pattern = b
        arr[i].buft = buft
    return arr, encoded


# --------------------------------------------------------------------------------------
# llama.cpp's log


_OVERRIDE_RE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([\d.]+) MiB")
_OFFLOADED_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# How llama.cpp and ggml say that a buffer did not fit (host or device memory).
_OOM_RE = re.compile(r"out of memory|failed to allocate|unable to allocate", re.IGNORECASE)
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


_LOG = _LogRouter()


def _parse_placement(lines: list[str], n_gpu_layers: int) -> PlacementReport:
    overridden: list[tuple[str, str]] = []
    buffers: list[BufferSize] = []
    for line in lines:
        if m := _OVERRIDE_RE.search(line):
            overridden.append((m.group(1), m.group(2)))
        elif m := _BUFFER_RE.search(line):
            kind = m.group(2).lower()
            buffers.append(BufferSize(kind, m.group(1), round(float(m.group(3)) * 1024 * 1024)))
        elif m := _OFFLOADED_RE.search(line):
            n_gpu_layers = int(m.group(1))
    layers = sorted({int(m.group(1)) for name, _ in overridden if (m := _LAYER_RE.match(name))})
    return PlacementReport(n_gpu_layers, tuple(layers), tuple(overridden), tuple(buffers))


def _load_failure(path: Path, lines: list[str]) -> errors.QwenrunError:
    """Turn llama.cpp's own complaint into a message a user can act on."""
    text = "\n".join(lines)
    if m := re.search(r"unknown model architecture: '([^']*)'", text):
        return errors.UnsupportedModelError(
            f"{path.name}: architecture {m.group(1)!r} is not supported by this llama.cpp",
            hint="qwenrun runs Qwen3 / Qwen3-MoE / Qwen3-Next / Qwen3.5 models",
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
    if _OOM_RE.search(text):
        return errors.OutOfMemoryError(
            f"not enough memory to load {path.name}",
            hint="put more experts on the CPU (--n-cpu-moe) or use a smaller quant",
        )
    reason = next(
        (ln.split(":", 1)[-1].strip() for ln in reversed(lines) if "error" in ln.lower()),
        "see the log with --verbose",
    )
    return errors.InvalidModelError(f"llama.cpp could not load {path.name}: {reason}")


# --------------------------------------------------------------------------------------
# The engine


_KV_TYPE_IDS = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def _check_file(path: Path) -> None:
    """Catch what llama.cpp would only report as a NULL model, with a clear message."""
    if not path.exists():
        raise errors.ModelNotFoundError(
            f"model file not found: {path}", hint="check the path, or `qwenrun list`"
        )
    if path.is_dir():
        raise errors.InvalidModelError(f"{path} is a folder, not a GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise errors.InvalidModelError(
            f"{path.name} is not a GGUF file (it does not start with the GGUF magic)",
            hint="pass a .gguf model file",
        )


class Engine:
    """One loaded model and its context. Not thread-safe: one generation at a time."""

    config: LoadConfig
    meta: ModelMeta
    placement: PlacementReport
    n_ctx: int
    n_batch: int
    _vocab: Any
    _mem: Any
    _recurrent: bool

    def __init__(self) -> None:  # use Engine.load
        self._model: Any = None
        self._ctx: Any = None
        self._keep: tuple[Any, ...] = ()
        self._cache: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.log_lines: list[str] = []

    # ---- loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        config: LoadConfig | None = None,
        *,
        verbose: bool = False,
        on_progress: Callable[[float], None] | None = None,
    ) -> Engine:
        config = config or LoadConfig()
        path = Path(path)
        _check_file(path)
        lc = _llama()
        self = cls()
        self.config = config
        _LOG.echo = verbose
        mark = _LOG.mark()

        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = config.placement.n_gpu_layers
        mparams.load_mode = lc.LLAMA_LOAD_MODE_MMAP if config.mmap_enabled() else 0
        patterns = config.placement.override_patterns()
        arr, encoded = _override_array(patterns) if patterns else (None, [])
        if arr is not None:
            mparams.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        # An exception (Ctrl-C above all) raised inside a ctypes callback would be printed
        # and swallowed; the callback stores it, cancels the load, and it is raised after.
        interrupted: list[BaseException] = []

        def _progress(p: float, _user: Any) -> bool:
            try:
                if on_progress is not None:
                    on_progress(float(p))
            except BaseException as exc:
                interrupted.append(exc)
                return False  # false cancels the load
            return True

        progress_cb = lc.llama_progress_callback(_progress)
        mparams.progress_callback = progress_cb
        # The override array and its strings must outlive the model (llama.cpp keeps the
        # pointer in the model's params), so the engine holds them until close().
        self._keep = (arr, encoded, progress_cb)

        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if interrupted:
            if model:
                lc.llama_model_free(model)
            raise interrupted[0]
        if not model:
            lines = [ln for _, ln in _LOG.since(mark)]
            raise _load_failure(path, lines)
        self._model = model

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = min(config.n_ubatch, config.n_batch)
        cparams.n_seq_max = 1
        threads = config.n_threads or _default_threads()
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        kv = _KV_TYPE_IDS.get(config.kv_type.lower())
        if kv is None:
            self.close()
            raise errors.UsageError(
                f"unknown KV cache type {config.kv_type!r}",
                hint=f"use one of {', '.join(_KV_TYPE_IDS)}",
            )
        cparams.type_k = kv
        cparams.type_v = kv
        cparams.no_perf = False
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lines = [ln for _, ln in _LOG.since(mark)]
            self.close()
            reason = next((ln for ln in reversed(lines) if ln.strip()), "")
            if _OOM_RE.search("\n".join(lines)):
                raise errors.OutOfMemoryError(
                    f"not enough memory for a context of {config.n_ctx} tokens",
                    hint="try a smaller --ctx, or --kv-type q8_0",
                )
            raise errors.BackendError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens: {reason.strip()}",
                hint="try a smaller --ctx, or a quantized KV cache with flash attention",
            )
        self._ctx = ctx
        self._vocab = lc.llama_model_get_vocab(model)
        self._mem = lc.llama_get_memory(ctx)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_batch = int(config.n_batch)
        self._recurrent = bool(
            lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model)
        )
        self.log_lines = [ln for _, ln in _LOG.since(mark)]
        self.placement = _parse_placement(self.log_lines, config.placement.n_gpu_layers)
        self.meta = self._read_meta(path)
        return self

    def _read_meta(self, path: Path) -> ModelMeta:
        lc = _llama()
        meta: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(lc.llama_model_meta_count(self._model)):
            k = lc.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if k >= 0 else ""
            if not key or key.startswith("tokenizer.ggml."):
                continue  # the vocab arrays: large and useless here
            n = lc.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf))
            if n >= 0:
                meta[key] = buf.value.decode("utf-8", "replace")
        template_ptr = lc.llama_model_chat_template(self._model, None)
        template = template_ptr.decode("utf-8") if template_ptr else None
        arch = meta.get("general.architecture", "")
        bos = lc.llama_vocab_bos(self._vocab)
        eos = lc.llama_vocab_eos(self._vocab)
        return ModelMeta(
            path=str(path),
            arch=arch,
            n_layer=int(lc.llama_model_n_layer(self._model)),
            n_ctx_train=int(lc.llama_model_n_ctx_train(self._model)),
            n_vocab=int(lc.llama_vocab_n_tokens(self._vocab)),
            chat_template=template,
            bos_token=self.token_text(bos) if bos >= 0 else "",
            eos_token=self.token_text(eos) if eos >= 0 else "",
            is_recurrent=self._recurrent,
            metadata=meta,
        )

    def close(self) -> None:
        lc = _lc
        if lc is None:
            return
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None
        self._keep = ()
        _LOG.trim()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the bindings may already be gone.
        with contextlib.suppress(Exception):
            self.close()

    # ---- tokens

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Text → token ids; `special` parses `<|im_start|>` and friends as single tokens."""
        lc = _llama()
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), arr, cap, False, special)
        if n < 0:
            cap = -n
            arr = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), arr, cap, False, special)
        return list(arr[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token adds to the text.

        Control tokens (`<|im_end|>`, `<|im_start|>`) render as nothing, as in llama.cpp's
        own detokenizer; user-defined ones such as `<think>` keep their text, because the
        thinking splitter needs to see them.
        """
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._to_piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        lc = _llama()
        n = lc.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, big, -n, 0, special)
            return big.raw[:n]
        return self._piece_buf.raw[:n]

    def token_text(self, token: int) -> str:
        """A token's own text, special tokens included (`<|im_end|>`)."""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(_llama().llama_vocab_is_eog(self._vocab, token))

    # ---- generation

    def reset(self) -> None:
        """Forget the KV cache (and recurrent state): the next prompt is evaluated whole."""
        _llama().llama_memory_clear(self._mem, True)
        self._cache = []

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        cancel: threading.Event | None = None,
    ) -> Generation:
        prompt = list(prompt_tokens)
        if not prompt:
            raise errors.UsageError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise errors.ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.n_ctx}",
                hint="shorten the prompt or raise --ctx",
            )
        return Generation(self, prompt, sampling or SamplingParams(), max_tokens, cancel)

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Drop what the cache holds past the common prefix; return how many tokens stay."""
        lc = _llama()
        cache = self._cache
        n = 0
        limit = min(len(cache), len(prompt))
        while n < limit and cache[n] == prompt[n]:
            n += 1
        # The last prompt token must be evaluated again to get its logits.
        n = min(n, len(prompt) - 1)
        if n < len(cache):
            # A recurrent state cannot roll back to an earlier position: llama.cpp refuses
            # the partial removal, and then only a full re-evaluation is correct.
            if n == 0 or not lc.llama_memory_seq_rm(self._mem, 0, n, -1):
                lc.llama_memory_clear(self._mem, True)
                n = 0
            del cache[n:]
        return n

    def _decode_chunk(self, tokens: list[int], cancel: threading.Event | None = None) -> bool:
        """Evaluate `tokens` in batches; False if `cancel` was set between two batches.

        The cache grows only by batches that were evaluated, so it stays true either way.
        """
        lc = _llama()
        for start in range(0, len(tokens), self.n_batch):
            if cancel is not None and cancel.is_set():
                return False
            chunk = tokens[start : start + self.n_batch]
            arr = (lc.llama_token * len(chunk))(*chunk)
            rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                # The cache may hold part of the chunk: forget it rather than trust it.
                self.reset()
                raise errors.BackendError(
                    f"llama_decode failed with code {rc} while evaluating the prompt",
                    hint="the context may be full; raise --ctx or start a new conversation",
                )
            self._cache.extend(chunk)
        return True

    def _sampler_chain(self, s: SamplingParams) -> Any:
        lc = _llama()
        sp = lc.llama_sampler_chain_default_params()
        sp.no_perf = False
        chain = lc.llama_sampler_chain_init(sp)
        add = lc.llama_sampler_chain_add
        if s.repeat_penalty != 1.0 or s.presence_penalty != 0.0:
            add(
                chain,
                lc.llama_sampler_init_penalties(64, s.repeat_penalty, 0.0, s.presence_penalty),
            )
        if s.temperature <= 0:
            add(chain, lc.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(chain, lc.llama_sampler_init_top_k(s.top_k))
        if 0 < s.top_p < 1:
            add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(chain, lc.llama_sampler_init_min_p(s.min_p, 1))
        add(chain, lc.llama_sampler_init_temp(s.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        add(chain, lc.llama_sampler_init_dist(seed))
        return chain


def _default_threads() -> int:
    # Decoding is memory-bound: physical cores, not hyper-threads, give the best speed.
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)


class Generation:
    """A stream of decoded text pieces from one `Engine.generate` call.

    Iterate it to run the model. UTF-8 characters split across tokens come out whole;
    every token counts against `max_tokens`, including bytes held back for an unfinished
    character. After the loop ends, `finish_reason` and `stats` are set.
    """

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        cancel: threading.Event | None,
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._sampling = sampling
        self._max_tokens = max_tokens
        self._cancel = cancel
        self._forced: deque[int] = deque()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stats: GenStats | None = None
        self._iter: Iterator[str] | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    def force_text(self, text: str) -> None:
        """Decode these tokens next instead of sampling (e.g. close a thinking block)."""
        self._forced.extend(self._engine.tokenize(text, special=True))

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._iter is None:
            self._iter = self._run()
        return next(self._iter)

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)

    def _run(self) -> Iterator[str]:
        eng = self._engine
        lc = _llama()
        ctx, vocab = eng._ctx, eng._vocab
        t0 = time.perf_counter()
        lc.llama_perf_context_reset(ctx)
        chain = eng._sampler_chain(self._sampling)
        try:
            n_keep = eng._reuse_prefix(self._prompt)
            new = self._prompt[n_keep:]
            if not eng._decode_chunk(new, self._cancel):
                # Ctrl-C during a long prompt: stop before the first token.
                self.finish_reason = "cancelled"
                t = time.perf_counter()
                self.stats = self._stats(lc, chain, t0, t, 0.0, t, len(eng._cache) - n_keep)
                return
            t_prefill = time.perf_counter()

            # The hot loop: sample, piece, decode. Everything else is kept out of it or
            # made O(1): a reused one-token batch, cached pieces, bound locals.
            sample, accept = lc.llama_sampler_sample, lc.llama_sampler_accept
            decode, is_eog = lc.llama_decode, lc.llama_vocab_is_eog
            tok_arr = (lc.llama_token * 1)()
            batch = lc.llama_batch_get_one(tok_arr, 1)
            pieces = eng._pieces
            token_bytes = eng.token_bytes
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            forced, cancel, tokens, cache = self._forced, self._cancel, self.tokens, eng._cache
            max_tokens = self._max_tokens
            room = eng.n_ctx - len(cache)
            t_first = 0.0
            reason = "length"
            while len(tokens) < max_tokens:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if forced:
                    tok = forced.popleft()
                    accept(chain, tok)
                else:
                    tok = sample(chain, ctx, -1)
                    if is_eog(vocab, tok):
                        tokens.append(tok)
                        reason = "stop"
                        break
                tokens.append(tok)
                if not t_first:
                    t_first = time.perf_counter()
                piece = pieces.get(tok)
                text = utf8.decode(piece if piece is not None else token_bytes(tok))
                if text:
                    yield text
                if len(tokens) >= max_tokens:
                    break  # no need to evaluate a token nothing will follow
                if room <= 1:
                    reason = "length"  # the context is full
                    break
                tok_arr[0] = tok
                if decode(ctx, batch) != 0:
                    raise errors.BackendError(
                        "llama_decode failed during generation",
                        hint="the context may be full; raise --ctx",
                    )
                cache.append(tok)
                room -= 1
            tail = utf8.decode(b"", final=True)
            if tail:
                yield tail
            self.finish_reason = reason
            t_end = time.perf_counter()
            self.stats = self._stats(lc, chain, t0, t_prefill, t_first, t_end, len(new))
        finally:
            lc.llama_sampler_free(chain)

    def _stats(
        self,
        lc: ModuleType,
        chain: Any,
        t0: float,
        t_prefill: float,
        t_first: float,
        t_end: float,
        n_eval_prompt: int,
    ) -> GenStats:
        pc = lc.llama_perf_context(self._engine._ctx)
        ps = lc.llama_perf_sampler(chain)
        n = len(self.tokens)
        prefill_s = t_prefill - t0
        # Decode speed: tokens after the first, over the time after the first.
        decode_s = (t_end - t_first) if t_first else 0.0
        return GenStats(
            prompt_tokens=len(self._prompt),
            eval_prompt_tokens=n_eval_prompt,
            generated_tokens=n,
            ttft_ms=((t_first or t_end) - t0) * 1000,
            prefill_tok_s=n_eval_prompt / prefill_s if prefill_s > 0 else 0.0,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            decode_wall_ms=decode_s * 1000,
            llama_eval_ms=float(pc.t_eval_ms + pc.t_p_eval_ms),
            llama_sample_ms=float(ps.t_sample_ms),
        )
