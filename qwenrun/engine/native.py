"""llama-cpp-python's bindings, loaded once, and the ctypes pieces they lack.

Contract: the only module that imports `llama_cpp`, and only when `bindings()` is first
called, so `qwenrun --help` and the planner never pay for it. On first use it initialises
llama.cpp's backend, routes its log to `llamalog.LOG`, and binds the few ggml functions the
Python package does not (the device registry and buffer types). It builds the tensor
buffer-type override array that placement needs (llama-cpp-python declares that field as
an untyped pointer). It loads no model and keeps no state besides the bindings.
"""

from __future__ import annotations

import ctypes
import re
import threading
from types import ModuleType
from typing import Any

from qwenrun import errors
from qwenrun.engine.llamalog import LOG

_lc: ModuleType | None = None
_init_lock = threading.Lock()


def bindings() -> ModuleType:
    """Import the bindings once, init the backend, and route llama.cpp's log to us."""
    global _lc
    if _lc is not None:
        return _lc
    with _init_lock:
        if _lc is None:
            import llama_cpp.llama_cpp as lc

            lc.llama_backend_init()
            LOG.install(lc)
            _bind_ggml(lc)
            _lc = lc
    return _lc


def loaded() -> ModuleType | None:
    """The bindings if something already loaded them, else None (never loads them)."""
    return _lc


def supports_gpu_offload() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (CUDA, Metal, ...)."""
    return bool(bindings().llama_supports_gpu_offload())


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
    bindings()
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


def override_array(patterns: list[tuple[str, str]]) -> tuple[Any, list[bytes]]:
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
